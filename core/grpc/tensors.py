"""Tensors between the protobuf messages of ``inference.GRPCInferenceService`` and numpy.

An input comes either as raw bytes (``raw_input_contents``, one entry per input in order: what
tritonclient sends) or in the typed ``contents`` field of its datatype; outputs always go raw
(``raw_output_contents``), as Triton sends them, which every client reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from ketch.inference.calls import OutputTensor
from ketch.inference.shared_memory import (
    BYTE_SIZE,
    OFFSET,
    REGION,
    Placement,
    SharedMemory,
    placement_of,
)
from ketch.inference.tensors import (
    V2_TO_NUMPY,
    tensor_from_binary,
    tensor_from_json,
    tensor_to_binary,
)
from ketch.serving.jobs import PredictionError

#: Which field of ``InferTensorContents`` holds each datatype (FP16 has none: raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def input_tensors(request: Any, shared_memory: SharedMemory) -> dict[str, np.ndarray]:
    """The input tensors of a ``ModelInferRequest`` by name, the batch axis first; a 400
    naming the input for anything it cannot be. An input placed in a shared memory region is
    read from it, and has no entry in ``raw_input_contents`` (as tritonclient sends it)."""
    raw: Sequence[bytes] = request.raw_input_contents
    placements = [placement_of(t.name, parameters_of(t.parameters)) for t in request.inputs]
    in_message = sum(placed is None for placed in placements)
    if raw and len(raw) != in_message:
        raise PredictionError(
            400,
            f"raw_input_contents has {len(raw)} entries for {in_message} inputs not in shared "
            "memory: give every such input's raw contents, or none",
        )
    if not request.inputs:
        raise PredictionError(400, "the request has no inputs")
    tensors: dict[str, np.ndarray] = {}
    raw_index = 0
    for tensor, placed in zip(request.inputs, placements, strict=True):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if name in tensors:
            raise PredictionError(400, f"input {name!r} is given twice")
        if any(d < 0 for d in shape):
            raise PredictionError(
                400, f"input {name!r}: 'shape' must be a list of sizes >= 0, the batch first"
            )
        if placed is not None:
            tensors[name] = shared_memory.read(name, datatype, shape, placed)
            continue
        try:
            if raw:
                tensors[name] = tensor_from_binary(datatype, shape, raw[raw_index])
                raw_index += 1
            else:
                tensors[name] = _from_contents(datatype, shape, tensor.contents)
        except ValueError as exc:
            raise PredictionError(400, f"input {name!r}: {exc}") from None
    return tensors


def _from_contents(datatype: str, shape: list[int], contents: Any) -> np.ndarray:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        if datatype in V2_TO_NUMPY:
            raise ValueError(f"{datatype} travels only as raw_input_contents")
        known = ", ".join(V2_TO_NUMPY)
        raise ValueError(f"datatype {datatype!r} is not supported; use one of {known}")
    values = list(getattr(contents, field))
    if datatype == "BYTES":
        joined = b"".join(len(v).to_bytes(4, "little") + v for v in values)
        return tensor_from_binary(datatype, shape, joined)
    return tensor_from_json(datatype, shape, values)


def parameters_of(message_parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as plain Python values."""
    values: dict[str, Any] = {}
    for name, parameter in message_parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        values[name] = getattr(parameter, which) if which is not None else None
    return values


def set_parameter(target: Any, name: str, value: bool | int | float | str) -> None:
    """Set ``target[name]`` (a ``map<string, InferParameter>``) to ``value``."""
    parameter = target[name]
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = value


def output_placements(request: Any) -> dict[str, Placement]:
    """The outputs a ``ModelInferRequest`` asks for in a shared memory region, by name."""
    placed = ((o.name, placement_of(o.name, parameters_of(o.parameters))) for o in request.outputs)
    return {name: placement for name, placement in placed if placement is not None}


def infer_response(
    model: str,
    version: str,
    request_id: str,
    outputs: list[OutputTensor],
    placements: Mapping[str, Placement],
    shared_memory: SharedMemory,
) -> Any:
    """The ``ModelInferResponse`` carrying ``outputs`` as raw contents, but those written
    into the shared memory region ``placements`` names: they come last, with no raw contents
    (each raw entry belongs to the output of its index), and the region and size they took."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    in_regions = [o for o in outputs if o.name in placements]
    for output in [o for o in outputs if o.name not in placements]:
        response.outputs.add(
            name=output.name, datatype=output.datatype, shape=list(output.array.shape)
        )
        response.raw_output_contents.append(tensor_to_binary(output.datatype, output.array))
    for output in in_regions:
        placed = placements[output.name]
        size = shared_memory.write(output.name, output.datatype, output.array, placed)
        added = response.outputs.add(
            name=output.name, datatype=output.datatype, shape=list(output.array.shape)
        )
        set_parameter(added.parameters, REGION, placed.region)
        set_parameter(added.parameters, BYTE_SIZE, size)
        if placed.offset:
            set_parameter(added.parameters, OFFSET, placed.offset)
    return response
