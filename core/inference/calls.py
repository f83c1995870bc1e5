"""One Open Inference Protocol call on a model's queue, whichever protocol brought it.

A V2 tensor's first dimension is the batch: the request's inputs are cut into items along it,
and each item goes through the same path as one input of ``/models/{name}/predict`` (cache,
batching with other requests, deadlines). With one input tensor, an item is that tensor's row;
with several, an item is ``{input_name: row}``. The items' outputs are stacked back along the
first axis: one tensor per key when each output is a dict, else one tensor. A tensor the
model declares (or its runtime announces) in ``outputs`` is cast to that datatype, when every
value survives the cast (see :func:`~ketch.inference.tensors.cast_output`); else the answer is
a 500.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ketch.inference.tensors import (
    V2_TO_NUMPY,
    as_element_type,
    cast_output,
    v2_datatype,
    v2_datatype_of,
)
from ketch.serving.admission import Deadlines, predict
from ketch.serving.jobs import Inputs, PredictionError
from ketch.serving.queue import ModelQueue
from ketch.serving.sequence_queue import SequenceQueue


@dataclass(frozen=True, slots=True)
class InferCall:
    """One inference request, decoded from its protocol.

    :param inputs: the input tensors by name, each with the batch axis first (unless the
        model has none).
    :param outputs: the outputs asked for, by name; None for all of them.
    :param timeout_ms: the request's own timeout, if it gave one.
    :param parameters: the request's parameters for the model (:func:`model_parameters`):
        each item takes them to a model whose function takes ``params``; any other model
        refuses them (a 400 naming them, never dropped).
    :param classifications: outputs asked for as their top classes (Triton's classification
        extension, ``class_count``), by name.
    """

    inputs: dict[str, np.ndarray]
    outputs: list[str] | None = None
    timeout_ms: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    classifications: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """One output of an answered call: its V2 datatype and the stacked array."""

    name: str
    datatype: str
    array: np.ndarray


async def infer(queue: ModelQueue, deadlines: Deadlines, call: InferCall) -> list[OutputTensor]:
    """The output tensors ``queue``'s model gives for ``call``, within the deadline rule.

    A model without a batch axis (``max_batch_size=0``) takes the tensors whole, as one item:
    they get a batch axis of 1 here, and its outputs lose it again."""
    inputs = call.inputs
    if queue.spec.has_batch_axis:
        _check_batch(inputs)
    else:
        inputs = {name: array[np.newaxis] for name, array in inputs.items()}
    params = call.parameters or None
    if params and not queue.spec.takes_params:
        raise PredictionError(
            400,
            f"model {queue.spec.label()!r} takes no request parameters, got "
            f"{sorted(params)}; a model takes them with a second argument, params",
            **queue.labels(),
        )
    items = _items(queue, inputs)
    deadline = deadlines.deadline(call.timeout_ms, queue.spec.slo_ms)
    if isinstance(queue, SequenceQueue):
        outputs = await queue.sequences.step(
            params or {},
            deadline,
            lambda given, binding: predict(queue, items, deadline, given, binding),
        )
    else:
        outputs = await predict(queue, items, deadline, params)
    tensors = _output_tensors(queue, list(outputs), call.outputs)
    if call.classifications:
        tensors = [_classified(queue, t, call.classifications.get(t.name)) for t in tensors]
    if not queue.spec.has_batch_axis:
        return [OutputTensor(t.name, t.datatype, t.array[0]) for t in tensors]
    return tensors


#: Request parameters ketch reads itself (the deadline, how outputs travel), not the model's.
OWN_PARAMETERS = frozenset({"timeout", "binary_data_output"})


def model_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A request's parameters that are the model's: all but :data:`OWN_PARAMETERS`."""
    return {k: v for k, v in parameters.items() if k not in OWN_PARAMETERS}


def class_count_of(name: str, value: Any) -> int:
    """An output's ``classification`` parameter (Triton's ``class_count``), checked."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PredictionError(
            400, f"output {name!r}: 'classification' must be a class count >= 1, got {value!r}"
        )
    return value


def _classified(queue: ModelQueue, tensor: OutputTensor, count: int | None) -> OutputTensor:
    """``tensor`` as Triton's classification extension gives it: per item, its ``count``
    largest values as ``"value:index"`` text, largest first (index into the item, flattened)."""
    if count is None:
        return tensor
    if tensor.datatype == "BYTES":
        raise PredictionError(
            400,
            f"output {tensor.name!r} of model {queue.spec.label()!r} is BYTES: it has no "
            "classes to rank",
            **queue.labels(),
        )
    # The batch axis is there still (a model without one has it until infer takes it off).
    rows = tensor.array.reshape(len(tensor.array), -1).astype(np.float64)
    top = np.argsort(-rows, axis=1, kind="stable")[:, :count]
    labels = [
        [f"{row[i]:f}:{int(i)}" for i in indices] for row, indices in zip(rows, top, strict=True)
    ]
    return OutputTensor(tensor.name, "BYTES", np.asarray(labels, dtype=np.str_))


def _check_batch(tensors: Mapping[str, np.ndarray]) -> None:
    """A 400 unless the input tensors share one first (batch) dimension of at least 1."""
    batch_sizes = {array.shape[0] if array.ndim else -1 for array in tensors.values()}
    if -1 in batch_sizes:
        raise PredictionError(
            400, "every input's 'shape' must be a list of sizes >= 0, the batch first"
        )
    if len(batch_sizes) > 1:
        raise PredictionError(
            400, f"inputs must share their first (batch) dimension, got {sorted(batch_sizes)}"
        )
    if batch_sizes == {0}:
        raise PredictionError(400, "the batch dimension is 0: send at least one item")


def timeout_ms_of_parameters(parameters: Mapping[str, Any]) -> float | None:
    """A request's ``timeout`` parameter (microseconds, as tritonclient sends it) in ms."""
    timeout_us = parameters.get("timeout")
    if timeout_us is None:
        return None
    if isinstance(timeout_us, int | float) and not isinstance(timeout_us, bool):
        if 0 < timeout_us < 1e12:
            return timeout_us / 1000
    raise PredictionError(400, f"'parameters.timeout' must be microseconds > 0, got {timeout_us!r}")


def _items(queue: ModelQueue, tensors: dict[str, np.ndarray]) -> Inputs:
    """The request's tensors cut into the items the model's queue takes (see the module's
    docstring); checked against the model's declared tensors first, for errors naming them."""
    declared = {t.name: t for t in queue.spec.inputs}
    element_types = {t.name: t.datatype for t in queue.spec.inputs or queue.spec.hinted_inputs}
    try:
        tensors = {n: as_element_type(a, element_types.get(n)) for n, a in tensors.items()}
    except ValueError as exc:
        raise PredictionError(
            400, f"model {queue.spec.label()!r}: {exc}", **queue.labels()
        ) from None
    if declared:
        _check_names(queue, set(declared), set(tensors))
        for name, array in tensors.items():
            want = v2_datatype(declared[name].datatype)
            got = v2_datatype_of(array)
            if want == "BF16" and got == "FP32":
                # What clients that cannot make bfloat16 send: rounded to it, as a cast would.
                try:
                    tensors[name] = cast_output(array, "BF16")
                except ValueError as exc:
                    raise PredictionError(400, f"input {name!r}: {exc}") from None
            elif want in V2_TO_NUMPY and want != got:
                raise PredictionError(
                    400,
                    f"input {name!r} of model {queue.spec.label()!r} is {want}, got {got}",
                    **queue.labels(),
                )
    # Numpy models get their rows as arrays, stacked again (keeping the dtype) by the queue;
    # everything else gets Python values, as parsed JSON would be. Cache keys are built from
    # JSON, which float16 arrays cannot be, so cached models get Python values too.
    # Raw bytes (object arrays) go as Python values: they are no array a frame can carry.
    as_arrays = (
        queue.spec.batch_input == "numpy"
        and queue.cache is None
        and all(a.dtype != object for a in tensors.values())
    )
    if len(tensors) == 1 and len(declared) <= 1:
        (array,) = tensors.values()
        # The tensor itself, not its rows: stacking them again would copy what may lie in a
        # client's shared memory, which a worker on this machine reads where it lies.
        return array if as_arrays else array.tolist()
    columns = {name: array.tolist() for name, array in tensors.items()}
    batch = len(next(iter(columns.values())))
    return [{name: column[i] for name, column in columns.items()} for i in range(batch)]


def _check_names(queue: ModelQueue, declared: set[str], given: set[str]) -> None:
    problems = []
    if missing := sorted(declared - given):
        problems.append(f"missing {missing}")
    if unknown := sorted(given - declared):
        problems.append(f"unknown {unknown}")
    if problems:
        raise PredictionError(
            400,
            f"model {queue.spec.label()!r} takes inputs {sorted(declared)}: " + ", ".join(problems),
            **queue.labels(),
        )


def _output_tensors(
    queue: ModelQueue, outputs: list[Any], requested: list[str] | None
) -> list[OutputTensor]:
    """The items' outputs stacked into V2 tensors, only the ``requested`` ones when given."""
    if outputs and all(isinstance(o, Mapping) for o in outputs):
        names = list(outputs[0])
        columns = {name: [o.get(name) for o in outputs] for name in names}
    else:
        announced = queue.spec.outputs or queue.spec.hinted_outputs
        columns = {announced[0].name if announced else "output_0": outputs}
    if requested is not None:
        if unknown := [name for name in requested if name not in columns]:
            raise PredictionError(
                400,
                f"model {queue.spec.label()!r} has no outputs {unknown}; it has {list(columns)}",
                **queue.labels(),
            )
        columns = {name: columns[name] for name in dict.fromkeys(requested)}
    return [_output_tensor(queue, name, column) for name, column in columns.items()]


def _output_tensor(queue: ModelQueue, name: str, column: list[Any]) -> OutputTensor:
    try:
        array = np.asarray(column)
        if array.dtype.kind == "S":
            # numpy's fixed-width bytes drop trailing NULs: raw bytes stay objects.
            array = np.array(column, dtype=object)
    except ValueError:
        array = np.asarray(None, dtype=object)  # ragged: reported below like other objects
    datatype = v2_datatype_of(array)
    if datatype is None:
        raise PredictionError(
            500,
            f"output {name!r} of model {queue.spec.label()!r} is not a tensor V2 can carry "
            f"(numbers, booleans or strings of one shape per item), got {array.dtype.name}",
            **queue.labels(),
        )
    declared = next((t for t in queue.spec.outputs if t.name == name), None)
    want = v2_datatype(declared.datatype) if declared is not None else None
    if want is not None and want in V2_TO_NUMPY and want != datatype:
        try:
            array = cast_output(array, want)
        except ValueError as exc:
            raise PredictionError(
                500,
                f"output {name!r} of model {queue.spec.label()!r} is declared {want}, but the "
                f"model returned {datatype}: {exc}",
                **queue.labels(),
            ) from None
        datatype = want
    return OutputTensor(name, datatype, array)
