"""The ``python`` runtime: run a ``@ketch.model`` function on a batch inside a worker.

Every decorated function in the served file is served through it, like a saved model through
its framework's runtime: its artifact is the function as ``ketch worker`` names it,
``FILE_OR_MODULE:name``, with the option ``version``. It can also deploy a function under a
name of its own: ``ketch serve --model double=python:examples/quickstart.py:double``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from msgspec.structs import replace

from ketch.hookspecs import RegisterRuntime, hookimpl
from ketch.runtime import Runtime
from ketch.specs.models import BatchInput, Model, ModelSpec
from ketch.types import Outputs


class PythonRuntime(Runtime):
    """A ``@ketch.model`` function found by ``FILE_OR_MODULE:name``.

    Options: ``version``, the model's version when the file defines several.
    """

    # Deployed, the gateway sends lists; the announced spec says whether the function takes
    # numpy batches, and the worker stacks them for it.
    batch_input: ClassVar[BatchInput] = "list"
    artifact_is_path: ClassVar[bool] = False
    default_options: ClassVar[Mapping[str, Any]] = {"version": None}

    @classmethod
    def check(cls, artifact: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
        from ketch.specs.loader import Target

        checked = super().check(artifact, options)
        if artifact is None:
            raise ValueError("the python runtime needs the function as FILE_OR_MODULE:name")
        source = Target.parse(artifact).source
        if source.endswith(".py") and not Path(source).is_file():
            raise FileNotFoundError(f"no such file: {source!r}")
        return checked

    def __init__(self, artifact: str | None, options: Mapping[str, Any]) -> None:
        from ketch.specs.loader import Target, find_model

        super().__init__(artifact, options)
        if artifact is None:
            raise ValueError("the python runtime needs the function as FILE_OR_MODULE:name")
        version = self.options["version"]
        self._serve(find_model(Target.parse(artifact), None if version is None else str(version)))

    @classmethod
    def of(cls, model: Model[..., Any]) -> PythonRuntime:
        """The runtime of a model already imported, as the constructor would find it."""
        runtime = cls.__new__(cls)
        Runtime.__init__(runtime, None, {"version": model.spec.version})
        runtime._serve(model)
        return runtime

    def _serve(self, model: Model[..., Any]) -> None:
        self.model = model
        # Announce the tensors the function declared, as a framework runtime would its own.
        self.inputs, self.outputs = model.spec.inputs, model.spec.outputs
        # Async functions run on one event loop kept for the worker's life, so their clients
        # (HTTP sessions, connection pools) survive from one batch to the next.
        self._loop = asyncio.new_event_loop() if model.spec.is_async else None

    def predict(self, batch: Any) -> Outputs:
        return self._outputs(self.model.fn(batch))

    def predict_with_params(self, batch: Any, params: list[dict[str, Any]]) -> Outputs:
        return self._outputs(self.model.fn(batch, params))

    def _outputs(self, result: Any) -> Outputs:
        if self._loop is not None:
            result = self._loop.run_until_complete(result)
        outputs: Outputs = result  # the worker checks it is one output per input
        return outputs

    def announced_spec(self, declared: ModelSpec | None) -> ModelSpec:
        """The decorated function's own spec; deployed under a name of its own, the
        deployment's spec with the function's batch form and tensors."""
        found = self.model.spec
        if declared is None:
            return found
        return replace(
            super().announced_spec(declared),
            batch_input=found.batch_input,
            is_async=found.is_async,
            takes_params=found.takes_params,
        )


@hookimpl
def ketch_register_runtimes(register: RegisterRuntime) -> None:
    register("python", PythonRuntime)
