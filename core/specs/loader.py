"""Import the user's file or module and collect what it declares.

A served module declares at top level: ``@ketch.model`` functions (:class:`Model`),
``ketch.deploy(...)`` deployments (:class:`Deployment`) and ``ketch.app(...)`` applications
(:class:`AppSpec`), each assigned to a name. The loader collects them all the same way, by
scanning the module's globals once it is imported: nothing is registered behind the user's
back, and a declaration is served because the module holds it.

Only worker processes (and the short-lived discovery process) import user code: the gateway
never does, so a heavy or crashing import cannot take it down.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ketch.errors import TargetLoadError
from ketch.specs.apps import AppSpec
from ketch.specs.deployments import Deployment
from ketch.specs.models import Model
from ketch.specs.pipelines import PipelineSpec


@dataclass(frozen=True, slots=True)
class Target:
    """``PATH_OR_MODULE[:name]`` as written on the command line."""

    source: str
    model_name: str | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        source, sep, name = text.rpartition(":")
        # "C:/x.py" style drive letters and bare "file.py" have no model name part.
        if sep and name and source and not name.startswith(("/", "\\")):
            return cls(source, name)
        return cls(text)


def import_source(source: str) -> ModuleType:
    """Import a ``.py`` file by path, or a module by dotted name."""
    path = Path(source)
    if source.endswith(".py") or path.is_file():
        return _import_file(path)
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as exc:
        # Only blame the target when the missing module is the target (or a parent package);
        # a missing dependency inside it keeps its own error.
        if exc.name and (source == exc.name or source.startswith(exc.name + ".")):
            raise TargetLoadError(
                f"{source!r} is neither a Python file nor an importable module ({exc})"
            ) from exc
        raise


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise TargetLoadError(f"no such file: {str(path)!r}")
    resolved = path.resolve()
    # Let the file import its siblings, as `python file.py` would.
    folder = str(resolved.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module_name = resolved.stem if resolved.stem.isidentifier() else "ketch_user_module"
    loaded = sys.modules.get(module_name)
    if loaded is not None:
        if getattr(loaded, "__file__", None) == str(resolved):
            return loaded
        # Never shadow an imported module (a user's queue.py must not replace the stdlib's).
        module_name = f"ketch_user_{module_name}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise TargetLoadError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def models_in(module: ModuleType) -> list[Model[..., Any]]:
    """The models a module defines at top level, in definition order, each once."""
    found: dict[tuple[str, str], Model[..., Any]] = {}
    for value in vars(module).values():
        if not isinstance(value, Model):
            continue
        other = found.get(value.spec.key)
        if other is not None and other is not value:
            raise TargetLoadError(
                f"model {value.spec.label()!r} is defined twice in {module.__name__}: by "
                f"{other.fn.__qualname__} and {value.fn.__qualname__}; give one another "
                "name or version"
            )
        found[value.spec.key] = value
    return list(found.values())


def deployments_in(module: ModuleType) -> list[Deployment]:
    """The deployments a module declares at top level, in declaration order, each once, with
    a relative path taken as relative to the module's folder."""
    folder = _folder_of(module)
    found: dict[tuple[str, str], Deployment] = {}
    for value in vars(module).values():
        if not isinstance(value, Deployment):
            continue
        key = value.declared.key
        other = found.get(key)
        if other is not None and other is not value:
            raise TargetLoadError(
                f"model {value.declared.label()!r} is deployed twice in {module.__name__}; "
                "give one another name or version"
            )
        found[key] = value
    return [deployment.in_folder(folder) for deployment in found.values()]


def apps_in(module: ModuleType) -> list[AppSpec]:
    """The applications a module declares at top level with ``ketch.app``, in declaration
    order, each once."""
    found: dict[str, AppSpec] = {}
    for value in vars(module).values():
        if not isinstance(value, AppSpec):
            continue
        other = found.get(value.name)
        if other is not None and other != value:
            raise TargetLoadError(
                f"application {value.name!r} is declared twice in {module.__name__}"
            )
        found[value.name] = value
    return list(found.values())


def pipelines_in(module: ModuleType) -> list[PipelineSpec]:
    """The pipelines a module declares at top level with ``ketch.pipeline``, in declaration
    order, each once."""
    found: dict[str, PipelineSpec] = {}
    for value in vars(module).values():
        if not isinstance(value, PipelineSpec):
            continue
        other = found.get(value.name)
        if other is not None and other != value:
            raise TargetLoadError(f"pipeline {value.name!r} is declared twice in {module.__name__}")
        found[value.name] = value
    return list(found.values())


@dataclass(frozen=True, slots=True)
class Declarations:
    """Everything a served module declares: decorated functions, deployments (not yet
    checked by their runtimes), applications and pipelines."""

    models: list[Model[..., Any]]
    deployments: list[Deployment]
    apps: list[AppSpec]
    pipelines: list[PipelineSpec]


def served_declarations(module: ModuleType) -> Declarations:
    """What a served module declares; :class:`TargetLoadError` when a model is both a
    decorated function and a deployment, or when it declares no model at all."""
    models = models_in(module)
    deployments = deployments_in(module)
    decorated = {m.spec.key for m in models}
    for deployment in deployments:
        if deployment.declared.key in decorated:
            raise TargetLoadError(
                f"model {deployment.declared.label()!r} is both a decorated function and a "
                f"deployment in {module.__name__}; give one another name or version"
            )
    if not models and not deployments:
        raise TargetLoadError(
            f"{module.__name__!r} defines no model: decorate a function with @ketch.model or "
            "assign a deployment, resnet = ketch.deploy(...), at its top level"
        )
    return Declarations(models, deployments, apps_in(module), pipelines_in(module))


def _folder_of(module: ModuleType) -> Path:
    """The folder of a module's file (the current folder for one without a file)."""
    file = getattr(module, "__file__", None)
    return Path(file or "./.").resolve().parent


def load_models(target: Target) -> list[Model[..., Any]]:
    """Import ``target`` and return its models (only the named one when a name is given)."""
    module = import_source(target.source)
    models = models_in(module)
    if not models:
        raise TargetLoadError(
            f"{target.source!r} defines no model: decorate a function with @ketch.model"
        )
    if target.model_name is None:
        return models
    chosen = [m for m in models if m.spec.name == target.model_name]
    if not chosen:
        names = ", ".join(sorted({m.spec.name for m in models}))
        raise TargetLoadError(
            f"{target.source!r} has no model named {target.model_name!r}; it has: {names}"
        )
    return chosen


def find_model(target: Target, version: str | None) -> Model[..., Any]:
    """The one model a worker serves: by name and version when several match."""
    models = load_models(target)
    if version is not None:
        models = [m for m in models if m.spec.version == version]
        if not models:
            raise TargetLoadError(f"{target.source!r} has no model version {version!r}")
    if len(models) > 1:
        labels = ", ".join(m.spec.label() for m in models)
        raise TargetLoadError(
            f"{target.source!r} defines several models ({labels}); name one as "
            "PATH:name and, if needed, pass --model-version"
        )
    return models[0]
