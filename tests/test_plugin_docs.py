"""Meta-tests that keep the plugin surface honest: every hook is documented, its reference in
docs/plugins.md matches the hookspecs, and every hook is exercised by a test."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from ketch.hookspecs import hook_specs, reference

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
