"""JSON over HTTP, as every route of the gateway speaks it: responses (numpy values included),
request bodies, and the request's own timeout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from starlette.responses import Response

from ketch.serving.jobs import PredictionError

TIMEOUT_HEADER = "x-ketch-timeout-ms"

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def _to_json_value(value: Any) -> Any:
    """orjson's fallback: numpy values it does not take natively (float16, strided views)."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"cannot serialize {type(value).__qualname__} as JSON")


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


def timeout_ms_of(body: dict[str, Any], header: str | None) -> float | None:
    """The request's own timeout in ms: the ``timeout_ms`` field, else the header."""
    value: Any = body.get("timeout_ms")
    where = "'timeout_ms'"
    if value is None and header is not None:
        where = "the X-Ketch-Timeout-Ms header"
        try:
            value = float(header)
        except ValueError:
            value = header
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
        raise PredictionError(400, f"{where} must be a number of milliseconds > 0, got {value!r}")
    return float(value)


def json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")
