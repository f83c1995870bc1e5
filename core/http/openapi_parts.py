"""The pieces every operation of the OpenAPI document is made of: path parameters, request
bodies and answers that refer to the Structs' generated schemas, and those schemas."""

from __future__ import annotations

from typing import Any

import msgspec

from ketch.http import shapes

JSON_TYPE = "application/json"
_REF = "#/components/schemas/{name}"
#: Every Struct a reference was made to while the document was built: its components.
_REFERENCED: dict[str, type[msgspec.Struct]] = {}
NAME_PARAM = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
VERSION_PARAM = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
MODEL_PARAM = {
    "name": "model",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The model as the application lists it: 'name' or 'name:version'.",
}
TIMEOUT_PARAM = {
    "name": "X-Ketch-Timeout-Ms",
    "in": "header",
    "required": False,
    "schema": {"type": "number", "exclusiveMinimum": 0},
    "description": "The request's deadline in milliseconds (504 past it).",
}


def request_body(shape: type[msgspec.Struct]) -> dict[str, Any]:
    return {"required": True, "content": {JSON_TYPE: {"schema": schema_ref(shape)}}}


_REASONS = {
    400: "The request is malformed; the error names what is wrong.",
    404: "No such model, version or application.",
    409: "The query already had its feedback.",
    429: "The model's queue is full; retry after the Retry-After header's seconds.",
    500: "The model or the application's policy failed.",
    503: "No worker could answer, or the model is unhealthy.",
    504: "The request's deadline passed.",
}


def answers_of(
    description: str,
    schema: dict[str, Any],
    *errors: int,
    status: int = 200,
    why: dict[int, str] | None = None,
) -> dict[str, Any]:
    """``status`` (a success) with ``schema``, and each error status with the JSON error body,
    described by ``why`` where the usual reason does not fit the route."""
    table: dict[str, Any] = {
        str(status): {"description": description, "content": {JSON_TYPE: {"schema": schema}}}
    }
    reasons = {**_REASONS, **(why or {})}
    for error in errors:
        table[str(error)] = {
            "description": reasons[error],
            "content": {JSON_TYPE: {"schema": schema_ref(shapes.Error)}},
        }
    return table


def schema_ref(shape: type[msgspec.Struct]) -> dict[str, Any]:
    _REFERENCED[shape.__name__] = shape
    return {"$ref": _REF.format(name=shape.__name__)}


def components() -> dict[str, Any]:
    """The JSON Schema of every Struct referenced, and of the Structs they hold."""
    _, schemas = msgspec.json.schema_components(_REFERENCED.values(), ref_template=_REF)
    return schemas
