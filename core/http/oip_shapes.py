"""The Open Inference Protocol's bodies (KServe V2, REST), as msgspec Structs: requests are
decoded into them and the OpenAPI document is generated from them."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from ketch.inference.tensors import V2_TO_NUMPY

Datatype = Annotated[
    str,
    Meta(
        description="A V2 datatype: " + ", ".join(V2_TO_NUMPY) + ".",
        extra_json_schema={"enum": list(V2_TO_NUMPY)},
    ),
]
Size = Annotated[int, Meta(ge=0)]


class InputTensor(msgspec.Struct, kw_only=True):
    """One input tensor: its data as a flat JSON list (row-major), or as binary data after the
    JSON (``parameters.binary_data_size``)."""

    name: str
    shape: Annotated[list[Size], Meta(description="The batch first.")]
    datatype: str
    data: Any = UNSET
    parameters: dict[str, Any] = {}


class RequestedOutput(msgspec.Struct, kw_only=True):
    name: str
    parameters: dict[str, Any] = {}


class InferRequest(msgspec.Struct, kw_only=True):
    """``POST /v2/models/{name}[/versions/{version}]/infer``."""

    id: str | UnsetType = UNSET
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | UnsetType = UNSET
    parameters: Annotated[
        dict[str, Any], Meta(description="timeout: the request's deadline in microseconds.")
    ] = {}


class OutputTensor(msgspec.Struct, kw_only=True):
    name: str
    shape: list[int]
    datatype: Datatype
    data: list[Any]


class InferResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | UnsetType = UNSET
