"""One request's way into a model queue: cache lookups, numpy stacking, then the batcher.

Each input is looked up in the model version's cache (when it has one); only the misses are
queued, and their outputs are stored on the way back. For a model that takes numpy batches,
the request's inputs become one array here, in the gateway (``np.asarray`` on the parsed JSON,
no Python loop over elements): a batch is then one ``np.concatenate`` of its requests' arrays,
sent to the worker as a raw buffer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ketch.cache import input_key
from ketch.dispatch import ModelQueue
from ketch.jobs import Inputs, PredictionError
from ketch.types import Outputs


async def predict(queue: ModelQueue, inputs: list[Any], timeout_s: float) -> Outputs:
    """The outputs for ``inputs``, one each, from the cache or the model's workers."""
    cache = queue.cache
    if cache is None:
        return await queue.submit(_batchable(queue, inputs), timeout_s)
    keys = [input_key(x) for x in inputs]
    outputs: list[Any] = [None] * len(inputs)
    missing: list[int] = []
    for index, key in enumerate(keys):
        hit, output = cache.get(key)
        if hit:
            outputs[index] = output
        else:
            missing.append(index)
    if not missing:
        return outputs
    computed = await queue.submit(_batchable(queue, [inputs[i] for i in missing]), timeout_s)
    for index, output in zip(missing, computed, strict=True):
        outputs[index] = output
        cache.put(keys[index], output)
    return outputs


def _batchable(queue: ModelQueue, inputs: list[Any]) -> Inputs:
    if queue.spec.batch_input != "numpy":
        return inputs
    try:
        array = np.asarray(inputs)
    except (ValueError, TypeError) as exc:
        raise _not_stackable(queue, str(exc)) from None
    if array.dtype == object:
        raise _not_stackable(queue, "they are not numbers or strings of one shape")
    _check_tensor(queue, array)
    return array


def _check_tensor(queue: ModelQueue, array: np.ndarray) -> None:
    """A 400 naming the expected tensor when the inputs cannot be what the model takes."""
    if len(queue.spec.inputs) != 1:
        return  # unknown yet (no worker loaded it), or several named inputs
    (tensor,) = queue.spec.inputs
    item_shape = array.shape[1:]
    numeric = tensor.datatype not in ("str", "bytes") and np.dtype(tensor.datatype).kind in "biuf"
    if tensor.accepts(item_shape) and (not numeric or array.dtype.kind in "biuf"):
        return
    got = f"{array.dtype.name}[{', '.join(map(str, item_shape))}]"
    raise PredictionError(
        400,
        f"model {queue.spec.label()!r} takes inputs of {tensor.describe()} each, got {got}",
        model=queue.spec.name,
        version=queue.spec.version,
        expected={"shape": list(tensor.shape), "datatype": tensor.datatype},
    )


def _not_stackable(queue: ModelQueue, why: str) -> PredictionError:
    return PredictionError(
        400,
        f"inputs for model {queue.spec.label()!r} cannot be stacked into one array: {why}",
        model=queue.spec.name,
        version=queue.spec.version,
    )
