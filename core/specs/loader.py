"""Import the user's file or module and find the models it defines.

Only worker processes (and the short-lived discovery process) call this: the gateway never
imports user code, so a heavy or crashing import cannot take it down.
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
from ketch.specs.apps import APPS_ATTRIBUTE, AppSpec
from ketch.specs.deployments import DEPLOYMENTS_ATTRIBUTE
from ketch.specs.models import Model, ModelSpec


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


def apps_in(module: ModuleType) -> list[AppSpec]:
    """The applications a module declares with ``ketch.app``, in declaration order."""
    declared: dict[str, AppSpec] = vars(module).get(APPS_ATTRIBUTE, {})
    return list(declared.values())


def served_specs(module: ModuleType) -> list[ModelSpec]:
    """Every model a served module declares: decorated functions, then ``ketch.deploy``s."""
    specs = [m.spec for m in models_in(module)]
    seen = {spec.key for spec in specs}
    deployed: dict[tuple[str, str], ModelSpec] = vars(module).get(DEPLOYMENTS_ATTRIBUTE, {})
    for spec in deployed.values():
        if spec.key in seen:
            raise TargetLoadError(
                f"model {spec.label()!r} is both a decorated function and a deployment in "
                f"{module.__name__}; give one another name or version"
            )
        specs.append(spec)
    if not specs:
        raise TargetLoadError(
            f"{module.__name__!r} defines no model: decorate a function with @ketch.model or "
            "deploy a saved one with ketch.deploy"
        )
    return specs


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
