"""The ``python`` runtime: run a ``@ketch.model`` function on a batch inside a worker."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from ketch.errors import BatchInputError, BatchOutputError
from ketch.models import Model
from ketch.types import Outputs, Predict


def make_predict(model: Model[..., Any]) -> Predict:
    """A callable taking the batch's inputs and returning the model's outputs, checked.

    Async functions run on one event loop kept for the worker's life, so their clients (HTTP
    sessions, connection pools) survive from one batch to the next.
    """
    spec = model.spec
    fn = model.fn
    loop = asyncio.new_event_loop() if spec.is_async else None

    def predict(inputs: list[Any]) -> Outputs:
        batch = _stack(inputs, spec.label()) if spec.batch_input == "numpy" else inputs
        result = fn(batch)
        if loop is not None:
            result = loop.run_until_complete(result)
        return checked_outputs(result, len(inputs), spec.label())

    return predict


def _stack(inputs: list[Any], label: str) -> np.ndarray:
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
