"""JSON over HTTP, as every route of the gateway speaks it: responses (numpy values included),
request bodies, and the request's own timeout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec
import numpy as np
import orjson
from starlette.responses import Response

from ketch.http.body_errors import explain
from ketch.serving.jobs import PredictionError

T = TypeVar("T")

TIMEOUT_HEADER = "x-ketch-timeout-ms"

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def _to_json_value(value: Any) -> Any:
    """orjson's fallback: answers that are Structs, and numpy values it does not take natively
    (float16, strided views)."""
    if isinstance(value, msgspec.Struct):
        return msgspec.to_builtins(value)
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"cannot serialize {type(value).__qualname__} as JSON")


def decode_body(raw: bytes, shape: type[T]) -> T:
    """A request body as its Struct; a 400 naming the field and the value when it is not."""
    try:
        body: T = _decoder(shape).decode(raw)
    except msgspec.ValidationError as exc:
        raise PredictionError(400, explain(exc, raw, shape)) from None
    except msgspec.DecodeError as exc:
        raise PredictionError(400, f"request body is not valid JSON: {exc}") from None
    return body


def _decoder(shape: type[T]) -> msgspec.json.Decoder[T]:
    decoder = _DECODERS.get(shape)
    if decoder is None:
        decoder = _DECODERS[shape] = msgspec.json.Decoder(shape)
    return decoder


#: One decoder per body shape, built at its first request.
_DECODERS: dict[Any, Any] = {}


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    content = orjson.dumps(body, default=_to_json_value, option=_JSON_OPTIONS)
    return Response(content, status, headers, media_type="application/json")


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PredictionError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise PredictionError(
            400, f"request body must be a JSON object, got a JSON {json_kind(body)}"
        )
    return body


def timeout_ms_of(field: float | None, header: str | None) -> float | None:
    """The request's own timeout in ms: its body's ``timeout_ms`` (checked by its shape), else
    the ``X-Ketch-Timeout-Ms`` header."""
    if field is not None or header is None:
        return field
    try:
        value = float(header)
    except ValueError:
        value = None
    if value is None or not 0 < value < 1e9:
        raise PredictionError(
            400,
            f"the X-Ketch-Timeout-Ms header must be a number of milliseconds > 0, got {header!r}",
        )
    return value


def json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")
