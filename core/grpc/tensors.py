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


def input_tensors(request: Any) -> dict[str, np.ndarray]:
    """The input tensors of a ``ModelInferRequest`` by name, the batch axis first; a 400
    naming the input for anything it cannot be."""
    raw: Sequence[bytes] = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise PredictionError(
            400,
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
            "give every input's raw contents, or none",
        )
    if not request.inputs:
        raise PredictionError(400, "the request has no inputs")
    tensors: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if name in tensors:
            raise PredictionError(400, f"input {name!r} is given twice")
        if any(d < 0 for d in shape):
            raise PredictionError(
                400, f"input {name!r}: 'shape' must be a list of sizes >= 0, the batch first"
            )
        try:
            if raw:
                tensors[name] = tensor_from_binary(datatype, shape, raw[index])
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


def infer_response(model: str, version: str, request_id: str, outputs: list[OutputTensor]) -> Any:
    """The ``ModelInferResponse`` carrying ``outputs`` as raw contents."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for output in outputs:
        response.outputs.add(
            name=output.name, datatype=output.datatype, shape=list(output.array.shape)
        )
        response.raw_output_contents.append(tensor_to_binary(output.datatype, output.array))
    return response
