"""The bodies of ketch's own routes, as msgspec Structs: what requests send and what answers
hold. Request bodies are decoded into them (:func:`ketch.http.endpoints.decode_body`: a 400 that
names the field and the value), and the OpenAPI document is generated from them
(:mod:`ketch.http.openapi`), so the document cannot drift from the code.

The Open Inference Protocol's bodies are in :mod:`ketch.http.oip_shapes`, the management API's
in :mod:`ketch.http.admin_shapes`; ``GET /models`` describes each model version as
:class:`ketch.serving.status.ModelStatus`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

#: A request's own deadline, in milliseconds.
TimeoutMs = Annotated[
    float,
    Meta(
        gt=0,
        lt=1e9,
        description="The request's deadline in milliseconds (504 past it).",
        extra={"must": "a number of milliseconds > 0"},
    ),
]


NonEmptyList = Annotated[
    list[Any],
    Meta(min_length=1, description="Several inputs.", extra={"must": "a non-empty list"}),
]


class Error(msgspec.Struct, kw_only=True):
    """Every error answer: what was wrong, plus details that depend on the error (the model,
    its version, the expected tensor, the keys the body had, ...)."""

    error: Annotated[str, Meta(description="What was wrong, with the value, and what to do.")]


class PredictRequest(msgspec.Struct, kw_only=True):
    """``POST /models/{name}/predict``: exactly one of ``input`` and ``inputs``."""

    input: Annotated[Any, Meta(description="One input.")] = UNSET
    inputs: NonEmptyList | UnsetType = UNSET
    version: Annotated[
        str | int | None,
        Meta(
            description="The model version (default: the model's default version).",
            extra={"must": "a string (or an integer)"},
        ),
    ] = None
    timeout_ms: TimeoutMs | None = None


class PredictAnswer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A model's answer: ``output`` for a request with ``input``, else ``outputs``."""

    output: Annotated[Any, Meta(description="The output, for a request with input.")] = UNSET
    outputs: Annotated[list[Any], Meta(description="One output per input.")] | UnsetType = UNSET
    model: str
    version: str
    query_id: str


class AppRequest(msgspec.Struct, kw_only=True):
    """``POST /apps/{name}/predict``: an application answers one input."""

    input: Any = UNSET
    timeout_ms: TimeoutMs | None = None


class AppAnswer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An application's answer."""

    output: Any
    query_id: str
    app: str
    default: Annotated[bool, Meta(description="Whether the default_output answered.")]
    models: Annotated[list[str], Meta(description="The models whose predictions made it.")]
    missing: Annotated[
        dict[str, str], Meta(description="Models asked that did not answer in time, and why.")
    ]
    confidence: float | None = None
    explanation: str | UnsetType = UNSET


class StepReport(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What one step of a pipeline did for a query."""

    step: int
    models: list[str]
    ran: bool
    ms: Annotated[float, Meta(description="How long it took.")] | UnsetType = UNSET
    skipped_because: str | UnsetType = UNSET


class PipelineAnswer(msgspec.Struct, kw_only=True):
    """A pipeline's answer."""

    output: Any
    query_id: str
    app: str
    default: bool
    models: Annotated[list[str], Meta(description="The models whose outputs made it.")]
    confidence: float | None
    steps: list[StepReport]


class FeedbackRequest(msgspec.Struct, kw_only=True):
    """``POST /apps/{name}/feedback``: a reward, a label, or both, for an answered query."""

    query_id: Any = UNSET
    reward: Annotated[float, Meta(ge=0, le=1, extra={"must": "a number in [0, 1]"})] | None = None
    label: Any = UNSET


class FeedbackAnswer(msgspec.Struct, kw_only=True):
    query_id: str
    app: str
    reward: float | None
    rewards: Annotated[dict[str, float], Meta(description="The reward each model got.")]


class Live(msgspec.Struct, kw_only=True):
    live: bool


class Ready(msgspec.Struct, kw_only=True, omit_defaults=True):
    ready: bool
    models_not_ready: list[str] | UnsetType = UNSET
