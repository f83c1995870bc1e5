"""How a worker calls its runtime on a batch: the same wrapping for every runtime.

:func:`batch_predict` stacks the batch's inputs into one array when the model takes numpy
batches (``batch_input == "numpy"``; the gateway usually sends an array already, which stays
as it is), calls the runtime's ``predict``, and checks that one output per input came back, so
the worker answers a bad batch with an error that names the model instead of a wrong reply.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ketch.errors import BatchInputError, BatchOutputError
from ketch.runtime import Runtime
from ketch.specs.models import ModelSpec
from ketch.types import Outputs, Predict


def batch_predict(runtime: Runtime, spec: ModelSpec) -> Predict:
    """A callable taking a batch's inputs and returning ``runtime``'s outputs, checked."""
    label = spec.label()
    numpy_batches = spec.batch_input == "numpy"

    def predict(inputs: list[Any], params: list[dict[str, Any]] | None) -> Outputs:
        batch = stack(inputs, label) if numpy_batches else inputs
        if params is None:
            return checked_outputs(runtime.predict(batch), len(inputs), label)
        if len(params) != len(inputs):
            raise BatchInputError(
                f"model {label!r}: {len(params)} parameter sets for {len(inputs)} inputs"
            )
        return checked_outputs(runtime.predict_with_params(batch, params), len(inputs), label)

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
