"""Meta-tests that keep the plugin surface honest: every hook is documented, its reference in
docs/plugins.md matches the hookspecs, every hook is exercised by a test, and the built-in
policies' params in docs/plugins.md are the ones their Params structs declare."""

from __future__ import annotations

import inspect
from pathlib import Path

import msgspec
import pytest

from ketch.hookspecs import hook_specs, reference
from ketch.plugin_manager import load_plugins
from ketch.plugins import BUILTIN_PLUGINS
from ketch.plugins import params as policy_params

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(hook_specs())


def test_there_are_hooks() -> None:
    assert "ketch_register_policies" in HOOKS and len(HOOKS) >= 4


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_documents_its_parameters_and_return(hook: str) -> None:
    function = hook_specs()[hook]
    doc = inspect.getdoc(function) or ""
    for parameter in inspect.signature(function).parameters:
        assert f":param {parameter}:" in doc, f"{hook} does not document {parameter}"
    assert ":return:" in doc
    assert any(kind in doc for kind in ("Registration hook", "Decision hook", "Observer hook"))


def test_the_plugin_docs_hold_the_current_hook_reference() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert docs.endswith(reference()), (
        "docs/plugins.md's hook reference is out of date: regenerate it with "
        "`ketch plugins --reference`"
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook: str) -> None:
    this_file = Path(__file__).name
    tests = [
        path.read_text() for path in (ROOT / "tests").glob("test_*.py") if path.name != this_file
    ]
    assert any(hook in text for text in tests), f"no test uses {hook}"


def builtin_policies() -> dict[str, type]:
    plugins = load_plugins(autoload=False)
    return {
        name: cls
        for name, cls in plugins.policies().items()
        if plugins.plugin_of_policy(name) in BUILTIN_PLUGINS
    }


def test_every_built_in_policy_declares_its_params_once_as_a_struct() -> None:
    policies = builtin_policies()
    assert len(policies) >= 10
    for name, cls in policies.items():
        assert issubclass(cls.Params, policy_params.PolicyParams), name


def test_the_plugin_docs_hold_the_params_the_policies_declare() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert policy_params.reference(builtin_policies()) in docs, (
        "docs/plugins.md's table of policy params is out of date: regenerate it with "
        "`KETCH_DISABLE_PLUGIN_AUTOLOAD=1 ketch plugins --params`"
    )


@pytest.mark.parametrize("name", sorted(builtin_policies()))
def test_each_built_in_policy_takes_every_param_its_struct_declares_and_no_other(
    name: str,
) -> None:
    # The Struct is the policy's own check: the documented defaults, given explicitly, are
    # taken, and a parameter it does not declare (ucb1's seed) is refused, naming it.
    cls = builtin_policies()[name]
    defaults = msgspec.structs.asdict(cls.Params())
    cls(["a"], **defaults)
    with pytest.raises(TypeError, match=r"unknown parameter undeclared=1 \(this policy takes: "):
        cls(["a"], **defaults, undeclared=1)
