"""``ketch.deploy(...)`` and ``ketch serve --model``: serve a saved model without writing code.

A deployment names a runtime (``"torch"``, ``"tensorflow"``, ...) and its artifact. It takes the
same serving options as ``@ketch.model`` (batching, pool, resources); every other keyword is an
option of the runtime (``device="cpu"``), checked by the runtime where the deployment is
declared, without importing its framework, so a missing file or a misspelt option fails at
once with the path and the reason.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ketch.errors import TargetLoadError
from ketch.specs.models import (
    DEFAULT_VERSION,
    ModelSpec,
    PoolSpec,
    WorkerStart,
    validated_spec,
)
from ketch.specs.resources import Resources

#: Where ``ketch.deploy`` keeps a module's deployments, in that module's globals.
DEPLOYMENTS_ATTRIBUTE = "__ketch_deployments__"

_SPEC_OPTIONS = ("max_batch_size", "max_delay_ms", "slo_ms", "max_queue", "cache_size")
_POOL_OPTIONS = PoolSpec.__struct_fields__
_RESOURCE_OPTIONS = Resources.__struct_fields__
_START_OPTIONS = WorkerStart.__struct_fields__
#: ``NAME=RUNTIME:PATH`` as ``ketch serve --model`` takes it.
MODEL_ARGUMENT = re.compile(r"^(?P<name>[^=:]+)=(?P<runtime>[A-Za-z][A-Za-z0-9_]*):(?P<path>.+)$")


def deploy(
    name: str,
    *,
    runtime: str,
    path: str | Path | None = None,
    version: str | int = DEFAULT_VERSION,
    **settings: Any,
) -> ModelSpec:
    """Declare a saved model in the served file: ``ketch.deploy("resnet", runtime="torch",
    path="model.pt2", device="cpu", max_batch_size=32)``.

    :param runtime: the name a runtime plugin registered (``ketch plugins`` lists them).
    :param path: the artifact, relative to the declaring file's folder (or absolute).
    :param version: the version label.
    :param settings: ``@ketch.model``'s serving options (``max_batch_size``, ``min_replicas``,
        ``memory_mb``, ...) and, apart from those, the runtime's own options.
    """
    caller = sys._getframe(1).f_globals
    folder = Path(caller.get("__file__") or "./.").resolve().parent
    artifact = None if path is None else str(path)
    spec = deployment_spec(name, runtime, artifact, folder, version, settings)
    declared: dict[tuple[str, str], ModelSpec] = caller.setdefault(DEPLOYMENTS_ATTRIBUTE, {})
    if spec.key in declared:
        raise ValueError(f"model {spec.label()!r} is deployed twice in {caller.get('__name__')}")
    declared[spec.key] = spec
    return spec


def parse_model_argument(text: str) -> ModelSpec:
    """``ketch serve --model NAME=RUNTIME:PATH`` as a deployment (the path relative to the
    current folder)."""
    match = MODEL_ARGUMENT.match(text)
    if match is None:
        raise TargetLoadError(
            f"--model {text!r} is not NAME=RUNTIME:PATH (for example resnet=torch:model.pt2)"
        )
    try:
        return deployment_spec(
            match["name"], match["runtime"], match["path"], Path.cwd(), DEFAULT_VERSION, {}
        )
    except (TypeError, ValueError) as exc:
        raise TargetLoadError(f"--model {text!r}: {exc}") from None


def deployment_spec(
    name: str,
    runtime: str,
    artifact: str | None,
    folder: Path,
    version: str | int,
    settings: Mapping[str, Any],
) -> ModelSpec:
    """A deployed model's spec, its runtime options checked by the runtime.

    :param folder: what a relative artifact path is relative to.
    """
    from ketch.plugin_manager import PluginError, installed_plugins

    serving = {k: v for k, v in settings.items() if k in _SPEC_OPTIONS}
    pool = {k: v for k, v in settings.items() if k in _POOL_OPTIONS}
    resources = {k: v for k, v in settings.items() if k in _RESOURCE_OPTIONS}
    start = {k: v for k, v in settings.items() if k in _START_OPTIONS}
    taken = {*serving, *pool, *resources, *start}
    runtime_options = {k: v for k, v in settings.items() if k not in taken}
    try:
        runtime_class = installed_plugins().runtime_class(runtime)
    except PluginError as exc:
        raise ValueError(f"model {name!r}: {exc}") from None
    if artifact is not None and runtime_class.artifact_is_path:
        artifact = str((folder / Path(artifact).expanduser()).resolve())
    try:
        checked = runtime_class.check(artifact, runtime_options)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise ValueError(f"model {name!r} (runtime {runtime!r}): {exc}") from None
    for key in ("cpus", "gpus"):
        if resources.get(key) is not None:
            resources[key] = tuple(resources[key])
    return validated_spec(
        name=name,
        version=version,
        batch_input=runtime_class.batch_input,
        pool=PoolSpec(**pool),
        resources=Resources(**resources),
        start=WorkerStart(**start),
        runtime=runtime,
        artifact=artifact,
        options=checked,
        **serving,
    )
