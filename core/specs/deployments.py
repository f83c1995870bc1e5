"""``ketch.deploy(...)`` and ``ketch serve --model``: serve a saved model without writing code.

A deployment names a runtime (``"torch"``, ``"tensorflow"``, ...) and its artifact. It takes the
same serving options as ``@ketch.model`` (batching, pool, resources), validated when it is
declared; every other keyword is an option of the runtime. A :class:`Deployment` is what was
declared; its runtime checks it where the plugins are loaded (the gateway, at start or when the
management API adds it): :meth:`Deployment.checked` resolves a relative path, checks the
artifact and the options without importing the framework, and gives the model's spec, so a
missing file or a misspelt option fails at once with the path and the reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import msgspec

from ketch.errors import TargetLoadError
from ketch.specs.models import (
    DEFAULT_VERSION,
    BatchInput,
    ModelSpec,
    PoolSpec,
    WorkerStart,
    declared_start,
    validated_spec,
)
from ketch.specs.resources import Resources

_SPEC_OPTIONS = (
    "max_batch_size",
    "max_delay_ms",
    "slo_ms",
    "max_queue",
    "cache_size",
    "stall_timeout_s",
)
_POOL_OPTIONS = PoolSpec.__struct_fields__
_RESOURCE_OPTIONS = Resources.__struct_fields__
_START_OPTIONS = WorkerStart.__struct_fields__
#: ``NAME=RUNTIME:PATH`` as ``ketch serve --model`` takes it.
MODEL_ARGUMENT = re.compile(r"^(?P<name>[^=:]+)=(?P<runtime>[A-Za-z][A-Za-z0-9_]*):(?P<path>.+)$")


class RuntimeCheck(Protocol):
    """What a deployment needs of its runtime's class; every :class:`ketch.Runtime` has it."""

    @property
    def batch_input(self) -> BatchInput: ...

    @property
    def artifact_is_path(self) -> bool: ...

    def check(self, artifact: str | None, options: Mapping[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Deployment:
    """A saved model as declared, before its runtime checked it.

    :param declared: its spec with the serving options validated, ``artifact`` as written and
        ``options`` as given.
    :param folder: what a relative artifact path is relative to: the declaring file's folder
        (the loader sets it when it collects the deployment), the server's working folder for
        ``--model`` and the management API; None: the current folder.
    """

    declared: ModelSpec
    folder: str | None = None

    @property
    def name(self) -> str:
        return self.declared.name

    @property
    def runtime(self) -> str:
        return self.declared.runtime

    def in_folder(self, folder: str | Path) -> Deployment:
        return replace(self, folder=str(folder))

    def checked(self, runtime: RuntimeCheck) -> ModelSpec:
        """The model's spec, its artifact resolved and its options checked by ``runtime``;
        ``ValueError`` naming the model, the runtime and what is wrong."""
        spec = self.declared
        artifact = spec.artifact
        folder = Path(self.folder) if self.folder is not None else Path.cwd()
        if artifact is not None and runtime.artifact_is_path:
            artifact = str((folder / Path(artifact).expanduser()).resolve())
        if isinstance(spec.start.env, str):
            env = str((folder / Path(spec.start.env).expanduser()).resolve())
            spec = msgspec.structs.replace(spec, start=msgspec.structs.replace(spec.start, env=env))
        try:
            options = runtime.check(artifact, spec.options)
        except (ValueError, FileNotFoundError, TypeError) as exc:
            raise ValueError(f"model {spec.name!r} (runtime {spec.runtime!r}): {exc}") from None
        return msgspec.structs.replace(
            spec, batch_input=runtime.batch_input, artifact=artifact, options=options
        )

    def to_dict(self) -> dict[str, Any]:
        return {"declared": self.declared.to_dict(), "folder": self.folder}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Deployment:
        return cls(ModelSpec.from_dict(data["declared"]), data.get("folder"))


def deploy(
    name: str,
    *,
    runtime: str,
    path: str | Path | None = None,
    version: str | int = DEFAULT_VERSION,
    **settings: Any,
) -> Deployment:
    """Declare a saved model in the served file: ``resnet = ketch.deploy("resnet",
    runtime="torch", path="model.pt2", device="cpu", max_batch_size=32)``.

    Assign it at the module's top level, as a decorated function is: ``ketch serve`` serves
    what the served file's globals hold.

    :param runtime: the name a runtime plugin registered (``ketch plugins`` lists them).
    :param path: the artifact, relative to the declaring file's folder (or absolute).
    :param version: the version label.
    :param settings: ``@ketch.model``'s serving options (``max_batch_size``, ``min_replicas``,
        ``memory_mb``, ...) and, apart from those, the runtime's own options.
    """
    return declared_deployment(
        name, runtime, None if path is None else str(path), version, settings
    )


def parse_model_argument(text: str) -> Deployment:
    """``ketch serve --model NAME=RUNTIME:PATH`` as a deployment (the path relative to the
    current folder)."""
    match = MODEL_ARGUMENT.match(text)
    if match is None:
        raise TargetLoadError(
            f"--model {text!r} is not NAME=RUNTIME:PATH (for example resnet=torch:model.pt2)"
        )
    try:
        deployment = declared_deployment(
            match["name"], match["runtime"], match["path"], DEFAULT_VERSION, {}
        )
    except (TypeError, ValueError) as exc:
        raise TargetLoadError(f"--model {text!r}: {exc}") from None
    return deployment.in_folder(Path.cwd())


def declared_deployment(
    name: str,
    runtime: str,
    artifact: str | None,
    version: str | int,
    settings: Mapping[str, Any],
    folder: Path | None = None,
) -> Deployment:
    """A deployment with its serving options validated (``ValueError``/``TypeError`` naming
    the bad value); the options that are none of them are the runtime's."""
    serving = {k: v for k, v in settings.items() if k in _SPEC_OPTIONS}
    pool = {k: v for k, v in settings.items() if k in _POOL_OPTIONS}
    resources = {k: v for k, v in settings.items() if k in _RESOURCE_OPTIONS}
    start = {k: v for k, v in settings.items() if k in _START_OPTIONS}
    taken = {*serving, *pool, *resources, *start}
    runtime_options = {k: v for k, v in settings.items() if k not in taken}
    if not isinstance(runtime, str) or not runtime:
        raise TypeError(f"runtime of model {name!r} must be a runtime's name, got {runtime!r}")
    for key in ("cpus", "gpus"):
        if resources.get(key) is not None:
            resources[key] = tuple(resources[key])
    spec = validated_spec(
        name=name,
        version=version,
        pool=PoolSpec(**pool),
        resources=Resources(**resources),
        start=declared_start(
            start.get("preload", False),
            start.get("python"),
            start.get("env"),
            start.get("placement"),
        ),
        runtime=runtime,
        artifact=artifact,
        options=runtime_options,
        **serving,
    )
    return Deployment(spec, None if folder is None else str(folder))
