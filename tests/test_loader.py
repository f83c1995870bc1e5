"""Unit tests for ``ketch.specs.loader``: parsing targets, importing user code, finding models."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ketch.errors import TargetLoadError
from ketch.specs.deployments import Deployment
from ketch.specs.loader import (
    Target,
    find_model,
    import_source,
    load_models,
    models_in,
    served_declarations,
)
from ketch.specs.models import Model

#: Every module a test writes has this prefix, so teardown can forget exactly those.
PREFIX = "ketch_loader_test_"

MODELS_SOURCE = """
import ketch

@ketch.model
def first(batch):
    return [x + 1 for x in batch]

@ketch.model(version=2)
def second(batch):
    return [x * 2 for x in batch]

@ketch.model(name="second")
def second_v1(batch):
    return [x * 3 for x in batch]
"""


@pytest.fixture(autouse=True)
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo what importing user files does to ``sys.path`` and ``sys.modules``."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(PREFIX) or name == "ketch_user_module":
            del sys.modules[name]
    importlib.invalidate_caches()


def unique(label: str = "mod") -> str:
    return f"{PREFIX}{label}_{uuid.uuid4().hex[:12]}"


def write(folder: Path, filename: str, source: str) -> Path:
    path = folder / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    importlib.invalidate_caches()
    return path


def write_module(folder: Path, source: str, label: str = "mod") -> Path:
    return write(folder, f"{unique(label)}.py", source)


def names(models: list[Model]) -> list[str]:
    return [m.spec.label() for m in models]


# --- Target.parse ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "source", "model_name"),
    [
        ("file.py", "file.py", None),
        ("file.py:sentiment", "file.py", "sentiment"),
        ("models/file.py:sentiment", "models/file.py", "sentiment"),
        ("/abs/path/file.py:name", "/abs/path/file.py", "name"),
        ("pkg.mod:name", "pkg.mod", "name"),
        ("pkg.mod", "pkg.mod", None),
        ("pkg", "pkg", None),
        ("C:/models/file.py", "C:/models/file.py", None),
        ("C:\\models\\file.py", "C:\\models\\file.py", None),
        ("C:\\models\\file.py:name", "C:\\models\\file.py", "name"),
    ],
)
def test_target_parse(text: str, source: str, model_name: str | None) -> None:
    assert Target.parse(text) == Target(source, model_name)


# --- importing files -------------------------------------------------------------------------


def test_file_target_loads_its_models(tmp_path: Path) -> None:
    path = write_module(tmp_path, MODELS_SOURCE)
    models = load_models(Target.parse(str(path)))
    assert names(models) == ["first:1", "second:2", "second:1"]
    assert models[0]([1, 2]) == [2, 3]


def test_relative_file_target_with_model_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_module(tmp_path, MODELS_SOURCE)
    monkeypatch.chdir(tmp_path)
    models = load_models(Target.parse(f"{path.name}:first"))
    assert names(models) == ["first:1"]


def test_file_can_import_its_siblings(tmp_path: Path) -> None:
    helper = unique("helper")
    write(tmp_path, f"{helper}.py", "def scale(x):\n    return x * 10\n")
    path = write_module(
        tmp_path,
        f"""
        import ketch
        from {helper} import scale

        @ketch.model
        def scaled(batch):
            return [scale(x) for x in batch]
        """,
    )
    (model,) = load_models(Target(str(path)))
    assert model([1, 2]) == [10, 20]


def test_file_importing_a_sibling_from_another_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run from elsewhere, as `ketch serve some/dir/file.py` would be.
    folder = tmp_path / "project"
    helper = unique("helper")
    write(folder, f"{helper}.py", "OFFSET = 100\n")
    path = write_module(
        folder,
        f"""
        import ketch
        from {helper} import OFFSET

        @ketch.model
        def shifted(batch):
            return [x + OFFSET for x in batch]
        """,
    )
    monkeypatch.chdir(tmp_path)
    (model,) = load_models(Target(str(path.relative_to(tmp_path))))
    assert model([1]) == [101]


def test_file_with_non_identifier_name_loads(tmp_path: Path) -> None:
    path = write(tmp_path, f"{unique()}-with-dashes.py", MODELS_SOURCE)
    assert names(load_models(Target(str(path)))) == ["first:1", "second:2", "second:1"]


def test_loading_the_same_file_twice_imports_it_once(tmp_path: Path) -> None:
    path = write_module(
        tmp_path,
        """
        import ketch

        IMPORTS = []
        IMPORTS.append(1)

        @ketch.model
        def once(batch):
            return batch
        """,
    )
    first = import_source(str(path))
    second = import_source(str(path))
    assert first is second
    assert first.IMPORTS == [1]


def test_file_whose_import_fails_propagates_and_can_be_retried(tmp_path: Path) -> None:
    path = write_module(tmp_path, "raise RuntimeError('model weights missing')\n")
    with pytest.raises(RuntimeError, match="model weights missing"):
        load_models(Target(str(path)))
    assert path.stem not in sys.modules
    path.write_text("import ketch\n\n@ketch.model\ndef fixed(batch):\n    return batch\n")
    importlib.invalidate_caches()
    assert names(load_models(Target(str(path)))) == ["fixed:1"]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.py"
    with pytest.raises(TargetLoadError, match=r"no such file: .*nowhere\.py"):
        load_models(Target(str(missing)))


def test_file_without_models_is_an_error(tmp_path: Path) -> None:
    path = write_module(tmp_path, "import ketch\n\ndef not_a_model(batch):\n    return batch\n")
    with pytest.raises(TargetLoadError, match="defines no model") as info:
        load_models(Target(str(path)))
    assert str(path) in str(info.value)
    assert "@ketch.model" in str(info.value)


# --- importing modules -----------------------------------------------------------------------


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package ``<pkg>.models`` on ``sys.path``; returns the package name."""
    name = unique("pkg")
    write(tmp_path, f"{name}/__init__.py", "")
    write(tmp_path, f"{name}/models.py", MODELS_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_module_target_with_name(package: str) -> None:
    models = load_models(Target.parse(f"{package}.models:first"))
    assert names(models) == ["first:1"]
    assert models[0]([41]) == [42]


def test_module_target_without_name_loads_all(package: str) -> None:
    models = load_models(Target.parse(f"{package}.models"))
    assert names(models) == ["first:1", "second:2", "second:1"]


def test_unknown_module_is_a_target_load_error() -> None:
    missing = unique("missing")
    with pytest.raises(TargetLoadError, match="neither a Python file nor an importable module"):
        load_models(Target(missing))


def test_unknown_submodule_of_a_real_package_is_a_target_load_error(package: str) -> None:
    with pytest.raises(TargetLoadError, match=rf"'{package}\.nope' is neither"):
        load_models(Target(f"{package}.nope"))


def test_missing_dependency_of_a_module_is_reported_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dependency = unique("dependency")
    target = write(tmp_path, f"{unique('user')}.py", f"import {dependency}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        load_models(Target(target.stem))
    assert info.value.name == dependency


def test_missing_dependency_sharing_a_prefix_with_the_module_is_not_blamed_on_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # e.g. `ketch serve torch_models` where torch_models does `import torch` and torch is not
    # installed: the target exists, its dependency does not.
    dependency = unique("torch")
    target = write(tmp_path, f"{dependency}_models.py", f"import {dependency}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        load_models(Target(target.stem))
    assert info.value.name == dependency


# --- finding models in a module --------------------------------------------------------------


def test_models_in_definition_order_and_aliases_counted_once(tmp_path: Path) -> None:
    path = write_module(
        tmp_path,
        """
        import ketch

        @ketch.model
        def zebra(batch):
            return batch

        @ketch.model
        def apple(batch):
            return batch

        alias = zebra
        another_alias = apple

        @ketch.model
        def mango(batch):
            return batch
        """,
    )
    module = import_source(str(path))
    models = models_in(module)
    assert names(models) == ["zebra:1", "apple:1", "mango:1"]
    assert models[0] is module.zebra


def test_models_in_ignores_non_model_values(tmp_path: Path) -> None:
    path = write_module(
        tmp_path,
        """
        import ketch
        from ketch import Model, model

        def helper(batch):
            return batch

        @ketch.model
        def real(batch):
            return batch
        """,
    )
    assert names(models_in(import_source(str(path)))) == ["real:1"]


def test_two_functions_with_same_name_and_version_are_refused(tmp_path: Path) -> None:
    path = write_module(
        tmp_path,
        """
        import ketch

        @ketch.model(name="sentiment", version=3)
        def old_sentiment(batch):
            return batch

        @ketch.model(name="sentiment", version="3")
        def new_sentiment(batch):
            return batch
        """,
    )
    with pytest.raises(TargetLoadError, match="'sentiment:3' is defined twice") as info:
        load_models(Target(str(path)))
    assert "old_sentiment" in str(info.value)
    assert "new_sentiment" in str(info.value)


def test_same_name_different_versions_are_both_found(tmp_path: Path) -> None:
    path = write_module(tmp_path, MODELS_SOURCE)
    models = load_models(Target.parse(f"{path}:second"))
    assert names(models) == ["second:2", "second:1"]


def test_unknown_model_name_lists_the_names_there_are(tmp_path: Path) -> None:
    path = write_module(tmp_path, MODELS_SOURCE)
    with pytest.raises(TargetLoadError, match=r"no model named 'third'; it has: first, second"):
        load_models(Target(str(path), "third"))


# --- find_model ------------------------------------------------------------------------------


def test_find_model_by_name_when_only_one_version(tmp_path: Path) -> None:
    path = write_module(tmp_path, MODELS_SOURCE)
    model = find_model(Target(str(path), "first"), None)
    assert model.spec.label() == "first:1"
    assert model([1]) == [2]


@pytest.mark.parametrize(("version", "result"), [("1", [3]), ("2", [2])])
def test_find_model_by_name_and_version(tmp_path: Path, version: str, result: list[int]) -> None:
    path = write_module(tmp_path, MODELS_SOURCE)
    model = find_model(Target(str(path), "second"), version)
    assert model.spec.key == ("second", version)
    assert model([1]) == result


def test_find_model_by_version_alone_when_it_is_unique(tmp_path: Path) -> None:
    path = write_module(tmp_path, MODELS_SOURCE)
    assert find_model(Target(str(path)), "2").spec.label() == "second:2"


def test_find_model_single_model_file_needs_no_name(tmp_path: Path) -> None:
    path = write_module(
        tmp_path, "import ketch\n\n@ketch.model\ndef only(batch):\n    return batch\n"
    )
    assert find_model(Target(str(path)), None).spec.label() == "only:1"


def test_find_model_with_several_candidates_lists_them(tmp_path: Path) -> None:
    path = write_module(tmp_path, MODELS_SOURCE)
    with pytest.raises(TargetLoadError, match="defines several models") as info:
        find_model(Target(str(path)), None)
    message = str(info.value)
    assert "first:1, second:2, second:1" in message
    assert "PATH:name" in message
    assert "--model-version" in message


def test_find_model_with_several_versions_of_one_name(tmp_path: Path) -> None:
    path = write_module(tmp_path, MODELS_SOURCE)
    with pytest.raises(TargetLoadError, match=r"several models \(second:2, second:1\)"):
        find_model(Target(str(path), "second"), None)


def test_find_model_unknown_version(tmp_path: Path) -> None:
    path = write_module(tmp_path, MODELS_SOURCE)
    with pytest.raises(TargetLoadError, match="has no model version '9'"):
        find_model(Target(str(path), "second"), "9")


def test_find_model_unknown_name(tmp_path: Path) -> None:
    path = write_module(tmp_path, MODELS_SOURCE)
    with pytest.raises(TargetLoadError, match="no model named 'missing'"):
        find_model(Target(str(path), "missing"), "1")


# --- what a served module declares -------------------------------------------------------------

DECLARATIONS_SOURCE = """
import ketch

@ketch.model
def plain(batch):
    return batch

table = ketch.deploy("table", runtime="torch", path="data/table.pt2", max_batch_size=8)
also_table = table
absolute = ketch.deploy("absolute", runtime="torch", path="/models/absolute.pt2")
reviews = ketch.app("reviews", models=["plain", "table"], policy="split")
ketch.app("forgotten", models=["plain"])
ketch.deploy("unassigned", runtime="torch", path="x.pt2")
"""


def test_the_loader_collects_models_deployments_and_apps_from_the_globals(
    tmp_path: Path,
) -> None:
    served = served_declarations(
        import_source(str(write(tmp_path, "served.py", DECLARATIONS_SOURCE)))
    )
    assert names(served.models) == ["plain:1"]
    # Each once, in declaration order; one not assigned to a name is not the module's.
    assert [d.name for d in served.deployments] == ["table", "absolute"]
    assert [a.name for a in served.apps] == ["reviews"]
    # A relative path is the declaring file's folder's, wherever the server runs.
    table = served.deployments[0]
    assert table.folder == str(tmp_path.resolve())
    assert table.declared.artifact == "data/table.pt2"
    assert table.declared.max_batch_size == 8


def test_a_deployment_path_is_resolved_against_its_folder_when_checked(tmp_path: Path) -> None:
    class PathRuntime:
        batch_input = "numpy"
        artifact_is_path = True

        @staticmethod
        def check(artifact: str | None, options: Any) -> dict[str, Any]:
            return {"seen": artifact}

    served = served_declarations(
        import_source(str(write(tmp_path, "served.py", DECLARATIONS_SOURCE)))
    )
    table, absolute = (d.checked(PathRuntime) for d in served.deployments)
    assert table.artifact == str(tmp_path.resolve() / "data" / "table.pt2")
    assert table.options == {"seen": table.artifact}
    assert absolute.artifact == "/models/absolute.pt2"


def test_a_deployment_round_trips_through_a_dict(tmp_path: Path) -> None:
    served = served_declarations(
        import_source(str(write(tmp_path, "served.py", DECLARATIONS_SOURCE)))
    )
    table = served.deployments[0]
    assert Deployment.from_dict(table.to_dict()) == table


def test_a_model_both_decorated_and_deployed_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "twice.py",
        """
        import ketch

        @ketch.model
        def same(batch):
            return batch

        other = ketch.deploy("same", runtime="torch", path="same.pt2")
        """,
    )
    with pytest.raises(TargetLoadError, match="'same:1' is both a decorated function and a"):
        served_declarations(import_source(str(path)))


def test_two_apps_of_one_name_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "apps.py",
        """
        import ketch

        @ketch.model
        def m(batch):
            return batch

        first = ketch.app("a", models=["m"])
        second = ketch.app("a", models=["m"], policy="shadow")
        """,
    )
    with pytest.raises(TargetLoadError, match="application 'a' is declared twice"):
        served_declarations(import_source(str(path)))


def test_a_module_with_only_unassigned_declarations_serves_nothing(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "unassigned.py",
        """
        import ketch

        ketch.deploy("lost", runtime="torch", path="lost.pt2")
        """,
    )
    with pytest.raises(TargetLoadError, match=r"defines no model.*resnet = ketch\.deploy"):
        served_declarations(import_source(str(path)))
