"""The plugin manager factory: built-ins, entry points, --plugin modules, and the errors a
plugin author gets for a misspelt hook, a clashing name or a plugin that fails to import."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ketch
from ketch.plugin_manager import DISABLE_AUTOLOAD_ENV, PluginError, load_plugins

WritePlugin = Callable[..., str]
BUILT_IN_POLICIES = {
    "single", "split", "shadow", "ensemble", "cascade",
    "epsilon_greedy", "ucb1", "thompson", "exp3", "exp4",
}  # fmt: skip


@pytest.fixture
def plugin_file(tmp_path: Path) -> Iterator[WritePlugin]:
    written: list[str] = []

    def write(source: str, name: str = "my_plugin.py") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        written.append(path.stem)
        return str(path)

    yield write
    for module in written:
        sys.modules.pop(module, None)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path where a test installs a distribution by writing its dist-info."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    return folder


def install(site: Path, dist: str, module: str, source: str) -> None:
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist}-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(f"[ketch]\n{module} = {module}\n")


def test_built_in_policies_come_through_the_registration_hook() -> None:
    plugins = load_plugins(autoload=False)
    assert set(plugins.policy_names) == BUILT_IN_POLICIES
    assert all(info.source == "built in" for info in plugins.describe())
    assert plugins.plugin_of_policy("exp3") == "ketch.plugins.bandits"


def test_an_entry_point_plugin_is_loaded_and_its_source_named(site: Path) -> None:
    install(
        site,
        "ketch-always-first",
        "always_first",
        """
        import ketch

        class AlwaysFirst(ketch.Policy):
            def select(self, query):
                return [self.models[0]]

        @ketch.hookimpl
        def ketch_register_policies(register):
            register("always_first", AlwaysFirst)
    """,
    )
    plugins = load_plugins()
    assert plugins.policy_class("always_first").__name__ == "AlwaysFirst"
    (info,) = [i for i in plugins.describe() if i.name == "always_first"]
    assert info.source == "entry point always_first (ketch-always-first 1.2)"
    assert info.policies == ("always_first",)
    sys.modules.pop("always_first", None)


def test_autoload_off_skips_entry_points(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(site, "ketch-skipped", "skipped_plugin", "raise RuntimeError('must not import')\n")
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    assert "skipped_plugin" not in {i.name for i in load_plugins().describe()}


def test_a_plugin_that_fails_to_import_is_named_with_its_distribution(site: Path) -> None:
    install(site, "ketch-broken", "broken_plugin", "import no_such_dependency\n")
    with pytest.raises(PluginError) as caught:
        load_plugins()
    message = str(caught.value)
    assert "plugin 'broken_plugin' (broken_plugin, from ketch-broken 1.2) failed to load" in message
    assert "ModuleNotFoundError" in message and DISABLE_AUTOLOAD_ENV in message


def test_a_misspelt_hook_fails_loudly(plugin_file: WritePlugin) -> None:
    path = plugin_file("""
        import ketch

        @ketch.hookimpl
        def ketch_register_policy(register):
            pass
    """)
    with pytest.raises(PluginError, match="unknown hook 'ketch_register_policy'"):
        load_plugins([path], autoload=False)


def test_two_plugins_registering_one_policy_name_are_both_named(
    plugin_file: WritePlugin,
) -> None:
    path = plugin_file(
        """
        import ketch

        @ketch.hookimpl
        def ketch_register_policies(register):
            register("exp3", ketch.Policy)
    """,
        "clash.py",
    )
    with pytest.raises(PluginError) as caught:
        load_plugins([path], autoload=False)
    assert (
        "policy 'exp3' is registered twice: by plugin 'ketch.plugins.bandits' and by "
        f"plugin {path!r}" in str(caught.value)
    )


@pytest.mark.parametrize(
    ("name", "registered", "message"),
    [
        ("bad name", "ketch.Policy", "registered a policy named 'bad name'"),
        ("not_a_policy", "dict", "which is not a subclass of ketch.Policy"),
    ],
)
def test_invalid_registrations_are_refused(
    plugin_file: WritePlugin, name: str, registered: str, message: str
) -> None:
    path = plugin_file(
        f"""
        import ketch

        @ketch.hookimpl
        def ketch_register_policies(register):
            register({name!r}, {registered})
    """,
        "invalid.py",
    )
    with pytest.raises(PluginError, match=message):
        load_plugins([path], autoload=False)


def test_unknown_policy_lists_the_installed_ones() -> None:
    with pytest.raises(PluginError, match="no policy named 'nope'; installed policies: cascade"):
        load_plugins(autoload=False).policy_class("nope")


def test_hookimpl_is_public_and_marks_ketch_hooks() -> None:
    @ketch.hookimpl
    def ketch_register_policies(register: object) -> None: ...

    assert hasattr(ketch_register_policies, "ketch_impl")


def test_a_plugin_file_is_loaded_by_its_absolute_path_for_the_workers(
    plugin_file: WritePlugin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = plugin_file("import ketch\n", name="relative_plugin.py")
    plugin_file("import ketch\n", name="dotted_plugin.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = load_plugins(["relative_plugin.py", "dotted_plugin"], autoload=False)
    # What a worker's plan carries, to load the same plugins in whatever folder it runs.
    assert plugins.references == (str(Path(path).resolve()), "dotted_plugin")
    assert plugins.autoload is False


def test_an_observer_hook_no_plugin_implements_is_not_called(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plugins = load_plugins(autoload=False)

    def must_not_run(**kwargs: object) -> None:
        raise AssertionError(f"called with {kwargs}")

    for hook in ("ketch_batch_done", "ketch_request_done", "ketch_worker_started"):
        monkeypatch.setattr(plugins.manager.hook, hook, must_not_run)
    plugins.batch_done("m", "1", 3, 0.01, 42)
    plugins.request_done("m", "1", 3, 0.02, 200)
    plugins.state_changed("model_ready", {"model": "m", "version": "1", "pid": 42, "host": "h"})


def test_an_observer_that_raises_is_logged_and_the_caller_goes_on(
    plugin_file: WritePlugin, caplog: pytest.LogCaptureFixture
) -> None:
    path = plugin_file(
        """
        import ketch

        @ketch.hookimpl
        def ketch_batch_done(model, version, size, compute_s, pid):
            raise RuntimeError("observer broke")
        """,
        name="raising_observer.py",
    )
    plugins = load_plugins([path], autoload=False)
    plugins.batch_done("m", "1", 3, 0.01, 42)
    assert "a plugin's ketch_batch_done raised" in caplog.text
    assert "observer broke" in caplog.text
