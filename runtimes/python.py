"""The ``python`` runtime: run a ``@ketch.model`` function on a batch inside a worker.

Decorated functions in the served file use it. Deployed, its artifact is the function as
``ketch worker`` names it, ``FILE_OR_MODULE:name``:
``ketch serve --model double=python:examples/quickstart.py:double``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ketch.errors import BatchInputError, BatchOutputError
from ketch.hookspecs import RegisterRuntime, hookimpl
from ketch.runtime import Runtime
from ketch.specs.models import BatchInput, Model
from ketch.types import Outputs, Predict


class PythonRuntime(Runtime):
    """A ``@ketch.model`` function found by ``FILE_OR_MODULE:name``.

    Options: ``version``, the model's version when the file defines several.
    """

    batch_input: ClassVar[BatchInput] = "list"  # the worker stacks numpy batches itself
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
        assert artifact is not None
        version = self.options["version"]
        self.model = find_model(Target.parse(artifact), None if version is None else str(version))
        # Announce the tensors the function declared, as a framework runtime would its own.
        self.inputs, self.outputs = self.model.spec.inputs, self.model.spec.outputs
        self._predict = make_predict(self.model)

    def predict(self, batch: Any) -> Outputs:
        return self._predict(list(batch))


@hookimpl
def ketch_register_runtimes(register: RegisterRuntime) -> None:
    register("python", PythonRuntime)


def make_predict(model: Model[..., Any]) -> Predict:
    """A callable taking the batch's inputs and returning the model's outputs, checked.

    Async functions run on one event loop kept for the worker's life, so their clients (HTTP
    sessions, connection pools) survive from one batch to the next.
    """
    spec = model.spec
    fn = model.fn
    loop = asyncio.new_event_loop() if spec.is_async else None

    def predict(inputs: list[Any]) -> Outputs:
        batch = stack(inputs, spec.label()) if spec.batch_input == "numpy" else inputs
        result = fn(batch)
        if loop is not None:
            result = loop.run_until_complete(result)
        return checked_outputs(result, len(inputs), spec.label())

    return predict


def stack(inputs: list[Any], label: str) -> np.ndarray:
    """The batch as one array, or :class:`BatchInputError` saying why it cannot be."""
    try:
        return np.asarray(inputs)
    except ValueError as exc:
        raise BatchInputError(
            f"inputs for model {label!r} cannot be stacked into one array: {exc}"
        ) from None


def checked_outputs(result: Any, batch_size: int, label: str) -> Outputs:
    """``result`` as a list or array of ``batch_size`` outputs, or :class:`BatchOutputError`."""
    if isinstance(result, np.ndarray):
        if result.ndim == 0:
            raise BatchOutputError(
                f"model {label!r} returned a 0-d array; return one output per input"
            )
        outputs: Outputs = result
    elif isinstance(result, list | tuple):
        outputs = list(result)
    else:
        raise BatchOutputError(
            f"model {label!r} returned {type(result).__qualname__}; "
            f"return a list or array with one output per input"
        )
    if len(outputs) != batch_size:
        raise BatchOutputError(
            f"model {label!r} returned {len(outputs)} outputs for a batch of "
            f"{batch_size} inputs; return exactly one output per input"
        )
    return outputs
