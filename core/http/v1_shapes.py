"""The bodies of the KServe V1 / TensorFlow Serving REST routes (:mod:`ketch.http.v1`), as
msgspec Structs: requests are decoded into them and the OpenAPI document is generated from them."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType


class V1PredictRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/models/{name}[/versions/{version}]:predict``: exactly one of ``instances``
    (the row format: one input per entry) and ``inputs`` (the columnar format: a list whose
    first axis is the batch, or named inputs, each such a list)."""

    instances: Annotated[list[Any], Meta(min_length=1)] | UnsetType = UNSET
    inputs: Any = UNSET
    signature_name: str | UnsetType = UNSET


class V1Predictions(msgspec.Struct, kw_only=True):
    """The answer to ``instances``: one prediction per instance."""

    predictions: list[Any]


class V1Outputs(msgspec.Struct, kw_only=True):
    """The answer to ``inputs``: the outputs in the columnar format."""

    outputs: Any


class V1VersionStatus(msgspec.Struct, kw_only=True):
    version: str
    state: Annotated[str, Meta(description="AVAILABLE, or UNAVAILABLE when it cannot serve.")]
    status: dict[str, str]


class V1ModelStatus(msgspec.Struct, kw_only=True):
    """``GET /v1/models/{name}[/versions/{version}]``: KServe V1's ``name`` and ``ready``,
    and TensorFlow Serving's ``model_version_status``, so both kinds of clients read it."""

    name: str
    ready: bool
    model_version_status: list[V1VersionStatus]
