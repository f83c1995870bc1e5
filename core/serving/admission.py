"""One request's way into a model queue: its deadline, cache lookups, checks and numpy
stacking, then the model's queue.

Every route computes its deadline with :class:`Deadlines`, one rule for all. Each input is
looked up in the model version's cache (when it has one); only the misses are queued, and their
outputs are stored on the way back. For a model that takes numpy batches,
the request's inputs become one array here, in the gateway (``np.asarray`` on the parsed JSON,
no Python loop over elements): a batch is then one ``np.concatenate`` of its requests' arrays,
sent to the worker as a raw buffer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ketch.serving.cache import input_key
from ketch.serving.jobs import Binding, Deadline, Inputs, PredictionError
from ketch.serving.queue import ModelQueue
from ketch.specs.signature import item_problem
from ketch.types import Outputs


@dataclass(frozen=True, slots=True)
class Deadlines:
    """The deadline rule of every route: a request's own timeout, else the latency objective
    (``slo_ms``) of what it asks for (a model, an application), else the server's request
    timeout.

    :param request_timeout_s: the server's request timeout (``--request-timeout``).
    """

    request_timeout_s: float

    def budget_s(self, requested_ms: float | None, objective_ms: float | None) -> float:
        """Seconds the request may take from now."""
        budget_ms = requested_ms if requested_ms is not None else objective_ms
        return self.request_timeout_s if budget_ms is None else budget_ms / 1000

    def deadline(self, requested_ms: float | None, objective_ms: float | None) -> Deadline:
        """By when a request starting now must be answered (or get a 504)."""
        budget_s = self.budget_s(requested_ms, objective_ms)
        return Deadline(time.monotonic() + budget_s, budget_s)


async def predict(
    queue: ModelQueue,
    inputs: Inputs,
    deadline: Deadline,
    params: dict[str, Any] | None = None,
    binding: Binding | None = None,
) -> Outputs:
    """The outputs for ``inputs``, one each, from the cache or the model's workers, by
    ``deadline`` (see :class:`Deadlines`); ``params`` go with each input to a model that
    takes them (and past the cache, whose keys are the inputs alone). A sequence model's
    requests are steps of a sequence (``binding``, from :mod:`ketch.serving.sequences`)."""
    if queue.spec.sequence and binding is None:
        raise PredictionError(
            400,
            f"model {queue.spec.label()!r} is a sequence model: each request names its "
            f"sequence (sequence_id) through the Open Inference Protocol, "
            f"POST /v2/models/{queue.spec.name}/infer or gRPC ModelInfer",
            **queue.labels(),
        )
    cache = queue.cache
    if cache is None or params:
        return await queue.submit(_batchable(queue, inputs), deadline, params, binding)
    looked_up = time.perf_counter()
    keys = [input_key(x) for x in inputs]
    outputs: list[Any] = [None] * len(inputs)
    missing: list[int] = []
    for index, key in enumerate(keys):
        hit, output = cache.get(key)
        if hit:
            outputs[index] = output
        else:
            missing.append(index)
    statistics = queue.statistics
    (statistics.cache_miss if missing else statistics.cache_hit).add(
        time.perf_counter() - looked_up
    )
    if not missing:
        return outputs
    computed = await queue.submit(_batchable(queue, [inputs[i] for i in missing]), deadline)
    for index, output in zip(missing, computed, strict=True):
        outputs[index] = output
        cache.put(keys[index], output)
    return outputs


def _batchable(queue: ModelQueue, inputs: Inputs) -> Inputs:
    if queue.spec.batch_input != "numpy":
        _check_items(queue, inputs)
        return inputs
    try:
        # asanyarray: an array in shared memory stays one (a worker may read it in place).
        array = np.asanyarray(inputs)
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
    if tensor.accepts(item_shape) and (not tensor.numeric or array.dtype.kind in "biuf"):
        return
    got = f"{array.dtype.name}[{', '.join(map(str, item_shape))}]"
    raise PredictionError(
        400,
        f"model {queue.spec.label()!r} takes inputs of {tensor.describe()} each, got {got}",
        **queue.labels(),
        expected={"shape": list(tensor.shape), "datatype": tensor.datatype},
    )


def _check_items(queue: ModelQueue, inputs: Inputs) -> None:
    """A 400 for a request whose inputs cannot be what the model's runtime announced, before
    they can share a batch with other requests' (and fail it)."""
    tensors = queue.spec.inputs
    if not tensors:
        return
    for index, value in enumerate(inputs):
        if problem := item_problem(tensors, value):
            takes = ", ".join(t.describe() for t in tensors)
            raise PredictionError(
                400,
                f"model {queue.spec.label()!r} takes inputs of {{{takes}}}; input {index}: "
                f"{problem}",
                **queue.labels(),
                expected=[t.to_dict() for t in tensors],
            )


def _not_stackable(queue: ModelQueue, why: str) -> PredictionError:
    return PredictionError(
        400,
        f"inputs for model {queue.spec.label()!r} cannot be stacked into one array: {why}",
        **queue.labels(),
    )
