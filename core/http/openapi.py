"""The OpenAPI document of the gateway, served at ``GET /openapi.json``.

Written out by hand rather than generated from docstrings: each operation says what it takes
and what it answers, in the words of ``docs/http-api.md``. A test checks that the document and
the gateway's routes list the same paths and methods, so neither drifts from the other.
Which routes need which bearer token is read off :mod:`ketch.http.auth`, the guard itself.
"""

from __future__ import annotations

from typing import Any

import ketch
from ketch.http.auth import OPEN_PATHS, is_admin_path

_JSON = "application/json"
_ERROR = {"$ref": "#/components/schemas/Error"}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
_MODEL_REFERENCE = {
    "name": "model",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The model as the application lists it: 'name' or 'name:version'.",
}
_TIMEOUT_HEADER = {
    "name": "X-Ketch-Timeout-Ms",
    "in": "header",
    "required": False,
    "schema": {"type": "number", "exclusiveMinimum": 0},
    "description": "The request's deadline in milliseconds (504 past it).",
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "What was wrong."}},
        "additionalProperties": True,
    },
    "PredictRequest": {
        "type": "object",
        "description": "Exactly one of input and inputs.",
        "properties": {
            "input": {"description": "One input."},
            "inputs": {"type": "array", "minItems": 1, "description": "Several inputs."},
            "version": {
                "type": "string",
                "description": "The model version (default: the highest).",
            },
            "timeout_ms": {"type": "number", "exclusiveMinimum": 0},
        },
    },
    "PredictResponse": {
        "type": "object",
        "required": ["model", "version", "query_id"],
        "properties": {
            "output": {"description": "The output, for a request with input."},
            "outputs": {"type": "array", "description": "One output per input."},
            "model": {"type": "string"},
            "version": {"type": "string"},
            "query_id": {"type": "string"},
        },
    },
    "AppRequest": {
        "type": "object",
        "required": ["input"],
        "properties": {"input": {}, "timeout_ms": {"type": "number", "exclusiveMinimum": 0}},
    },
    "AppResponse": {
        "type": "object",
        "required": ["output", "query_id", "app", "default", "models", "missing"],
        "properties": {
            "output": {},
            "query_id": {"type": "string"},
            "app": {"type": "string"},
            "default": {"type": "boolean", "description": "Whether default_output answered."},
            "models": {"type": "array", "items": {"type": "string"}},
            "confidence": {"type": ["number", "null"]},
            "missing": {"type": "object", "additionalProperties": {"type": "string"}},
            "explanation": {"type": "string"},
        },
    },
    "Feedback": {
        "type": "object",
        "required": ["query_id"],
        "description": "A reward, a label, or both.",
        "properties": {
            "query_id": {"type": "string"},
            "reward": {"type": "number", "minimum": 0, "maximum": 1},
            "label": {},
        },
    },
    "Tensor": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {
                "type": "string",
                "enum": [
                    *("BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16"),
                    *("UINT32", "UINT64", "FP16", "FP32", "FP64", "BYTES"),
                ],
            },
            "data": {"type": "array"},
            "parameters": {"type": "object"},
        },
    },
    "InferRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
            "outputs": {
                "type": "array",
                "items": {"type": "object", "properties": {"name": {"type": "string"}}},
            },
            "parameters": {"type": "object"},
        },
    },
    "InferResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
        },
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMeta"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMeta"}},
        },
    },
    "TensorMeta": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    },
}

_VERSION_LABEL: dict[str, Any] = {
    "type": ["string", "integer"],
    "description": "A version label; an integer is taken as its decimal text.",
}
_POOL_PROPERTIES: dict[str, Any] = {
    "min_replicas": {"type": "integer", "minimum": 0},
    "max_replicas": {"type": "integer", "minimum": 1},
    "idle_timeout_s": {"type": "number", "exclusiveMinimum": 0},
    "target_inflight": {"type": "integer", "minimum": 1},
    "cold_start_timeout_s": {"type": "number", "exclusiveMinimum": 0},
}
_APP_PROPERTIES: dict[str, Any] = {
    "models": {
        "type": "array",
        "minItems": 1,
        "items": {"type": "string"},
        "description": "'name' or 'name:version', in the order the policy sees them.",
    },
    "policy": {"type": "string", "description": "A policy's name (default single)."},
    "params": {"type": "object", "description": "Keyword arguments of the policy."},
    "slo_ms": {"type": ["number", "null"], "exclusiveMinimum": 0},
    "default_output": {"description": "Answered when no model answered in time."},
    "has_default_output": {
        "type": "boolean",
        "description": "Whether default_output is set (true whenever default_output is given; "
        "false drops it).",
    },
}
_ADMIN_SCHEMAS: dict[str, Any] = {
    "ModelVersion": {
        "type": "object",
        "description": "A model version as the gateway serves it.",
        "required": ["name", "version", "default", "state", "replicas", "pool"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "default": {
                "type": "boolean",
                "description": "Whether requests without a version go to this one.",
            },
            "state": {
                "type": "string",
                "enum": ["ready", "starting", "zero", "unavailable", "unhealthy"],
            },
            "replicas": {
                "type": "object",
                "properties": {
                    "ready": {"type": "integer"},
                    "starting": {"type": "integer"},
                },
            },
            "runtime": {"type": "string"},
            "artifact": {"type": ["string", "null"]},
            "queue_depth": {"type": "integer"},
            "active_requests": {"type": "integer"},
            "latency_ms": {
                "type": "object",
                "description": "Percentiles of arrival-to-answer time over the last 1,000 "
                "answered requests (null before any).",
                "properties": {
                    "requests": {"type": "integer"},
                    "p50": {"type": ["number", "null"]},
                    "p90": {"type": ["number", "null"]},
                    "p99": {"type": ["number", "null"]},
                },
            },
            "last_error": {"type": ["string", "null"]},
            "pool": {"$ref": "#/components/schemas/Pool"},
        },
        "additionalProperties": True,
    },
    "Pool": {
        "type": "object",
        "properties": _POOL_PROPERTIES,
    },
    "AppDescription": {
        "type": "object",
        "description": "An application: its spec, its counts and its policy's state.",
        "required": ["name", "models", "policy"],
        "properties": {
            "name": {"type": "string"},
            **_APP_PROPERTIES,
            "plugin": {"type": "string"},
            "queries": {"type": "integer"},
            "defaults": {"type": "integer"},
            "errors": {"type": "integer"},
            "feedback": {"type": "integer"},
            "policy_state": {"type": "object"},
        },
        "additionalProperties": True,
    },
    "AddModel": {
        "type": "object",
        "required": ["name", "runtime"],
        "properties": {
            "name": {"type": "string"},
            "runtime": {"type": "string", "description": "A runtime's name (ketch plugins)."},
            "path": {
                "type": ["string", "null"],
                "description": "The artifact; a relative path is relative to the server's "
                "working folder.",
            },
            "version": {**_VERSION_LABEL, "description": "The version label (default 1)."},
            "settings": {
                "type": "object",
                "description": "Serving options (max_batch_size, min_replicas, ...) and the "
                "runtime's own options, as ketch.deploy takes them.",
            },
            "wait": {
                "type": "boolean",
                "description": "Answer once a worker is ready (503 if none is by the pool's "
                "cold_start_timeout_s; the model stays added).",
            },
        },
        "additionalProperties": False,
    },
    "ModelAdded": {
        "type": "object",
        "required": ["model", "default_version"],
        "properties": {
            "model": {"$ref": "#/components/schemas/ModelVersion"},
            "default_version": {
                "type": "string",
                "description": "The version requests without one go to (a new version of a "
                "model already served takes none until it is rolled to).",
            },
        },
    },
    "ModelChanged": {
        "type": "object",
        "required": ["model"],
        "properties": {"model": {"$ref": "#/components/schemas/ModelVersion"}},
    },
    "ModelRemoved": {
        "type": "object",
        "required": ["removed", "default", "unfinished_requests"],
        "properties": {
            "removed": {
                "type": "array",
                "items": {"type": "string"},
                "description": "The versions removed, as 'name:version'.",
            },
            "default": {
                "type": ["string", "null"],
                "description": "Where requests without a version go now (null: nowhere).",
            },
            "unfinished_requests": {
                "type": "integer",
                "description": "Requests still queued after the server's request timeout.",
            },
        },
    },
    "PoolChange": {
        "type": "object",
        "minProperties": 1,
        "properties": _POOL_PROPERTIES,
        "additionalProperties": False,
    },
    "Roll": {
        "type": "object",
        "required": ["version"],
        "properties": {
            "version": _VERSION_LABEL,
            "timeout_s": {
                "type": "number",
                "exclusiveMinimum": 0,
                "description": "How long to wait for a ready worker of the version (default "
                "its pool's cold_start_timeout_s).",
            },
        },
        "additionalProperties": False,
    },
    "Rolled": {
        "type": "object",
        "required": ["model", "default", "previous"],
        "properties": {
            "model": {"type": "string"},
            "default": {"type": "string"},
            "previous": {"type": "string"},
        },
    },
    "AddApp": {
        "type": "object",
        "required": ["name", "models"],
        "properties": {"name": {"type": "string"}, **_APP_PROPERTIES},
        "additionalProperties": False,
    },
    "AppChange": {
        "type": "object",
        "minProperties": 1,
        "description": "The fields to change; the others keep their values, but params: "
        "a new policy without params starts with none.",
        "properties": _APP_PROPERTIES,
        "additionalProperties": False,
    },
    "AppAdded": {
        "type": "object",
        "required": ["app"],
        "properties": {"app": {"$ref": "#/components/schemas/AppDescription"}},
    },
    "AppChanged": {
        "type": "object",
        "required": ["app", "state"],
        "properties": {
            "app": {"$ref": "#/components/schemas/AppDescription"},
            "state": {
                "type": "string",
                "enum": ["kept", "reset"],
                "description": "Whether the policy kept what it learnt.",
            },
            "reset_because": {
                "type": "string",
                "description": "With state reset: why the policy starts afresh (another "
                "policy, or the policy could not take its previous state).",
            },
        },
    },
    "AppRemoved": {
        "type": "object",
        "required": ["removed"],
        "properties": {"removed": {"type": "string"}},
    },
    "Link": {
        "type": "object",
        "required": ["model"],
        "properties": {
            "model": {"type": "string", "description": "'name' or 'name:version'."},
            "position": {
                "type": "integer",
                "description": "Where in the application's list (default: last).",
            },
        },
        "additionalProperties": False,
    },
}


def _body(schema: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {_JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


_REASONS = {
    400: "The request is malformed; the error names what is wrong.",
    404: "No such model, version or application.",
    409: "The query already had its feedback.",
    429: "The model's queue is full; retry after the Retry-After header's seconds.",
    500: "The model or the application's policy failed.",
    503: "No worker could answer, or the model is unhealthy.",
    504: "The request's deadline passed.",
}


def _answers(
    description: str,
    schema: dict[str, Any],
    *errors: int,
    status: int = 200,
    why: dict[int, str] | None = None,
) -> dict[str, Any]:
    """``status`` (a success) with ``schema``, and each error status with the JSON error body,
    described by ``why`` where the usual reason does not fit the route."""
    answers: dict[str, Any] = {
        str(status): {"description": description, "content": {_JSON: {"schema": schema}}}
    }
    reasons = {**_REASONS, **(why or {})}
    for error in errors:
        answers[str(error)] = {
            "description": reasons[error],
            "content": {_JSON: {"schema": _ERROR}},
        }
    return answers


def _ref(schema: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{schema}"}


_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _v2_model_operations(parameters: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The metadata, readiness and infer operations of one model path (with or without a
    version)."""
    return {
        "": {
            "get": {
                "summary": "A model's metadata: versions, platform, input and output tensors.",
                "parameters": parameters,
                "responses": _answers("The model's metadata.", _ref("ModelMetadata"), 404),
            }
        },
        "/ready": {
            "get": {
                "summary": "Whether the model can serve (now, or by starting a worker).",
                "parameters": parameters,
                "responses": {
                    **_answers("The model is ready.", _ANY_OBJECT, 404),
                    "503": {"description": "The model is unhealthy."},
                },
            }
        },
        "/infer": {
            "post": {
                "summary": "Inference on tensors (Open Inference Protocol); the first "
                "dimension of each input is the batch.",
                "parameters": parameters,
                "requestBody": _body("InferRequest"),
                "responses": _answers(
                    "The output tensors.", _ref("InferResponse"), 400, 404, 429, 500, 503, 504
                ),
            }
        },
    }


def _list_of(key: str, schema: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [key],
        "properties": {key: {"type": "array", "items": _ref(schema)}},
    }


def _admin_operations() -> dict[str, dict[str, Any]]:
    """The management API (:mod:`ketch.http.admin`): every operation needs the admin token."""
    version = [_NAME, _VERSION]
    removal = {
        404: "No such model or version.",
        409: "An application links the model (or this version of it): the error lists them; "
        "or the version is the one requests without a version go to, while others are served: "
        "roll to another first.",
    }
    pool = {
        "summary": "Change a model version's pool (replica bounds, timings); the pool follows "
        "at its next tick. Without /versions/{version}: the version requests without one get.",
        "requestBody": _body("PoolChange"),
        "responses": _answers(
            "The model version with its new pool.", _ref("ModelChanged"), 400, 404
        ),
    }
    app_changed = "The application as it serves from now on."
    return {
        "/admin/models": {
            "get": {
                "summary": "Every model version, as GET /models lists them.",
                "responses": _answers("The models.", _list_of("models", "ModelVersion")),
            },
            "post": {
                "summary": "Serve a model from a runtime's artifact. A new version of a model "
                "already served takes no traffic until it is rolled to.",
                "requestBody": _body("AddModel"),
                "responses": _answers(
                    "The model version added.",
                    _ref("ModelAdded"),
                    400,
                    409,
                    503,
                    status=201,
                    why={
                        409: "That version of the model is already served.",
                        503: "With wait: the model was added, but no worker was ready in time "
                        "(or it is unhealthy).",
                    },
                ),
            },
        },
        "/admin/models/{name}": {
            "delete": {
                "summary": "Stop serving every version of a model; requests already queued "
                "are waited for (up to the server's request timeout) before its workers go.",
                "parameters": [_NAME],
                "responses": _answers(
                    "The versions removed.", _ref("ModelRemoved"), 404, 409, why=removal
                ),
            }
        },
        "/admin/models/{name}/versions/{version}": {
            "delete": {
                "summary": "Stop serving one version of a model; requests already queued are "
                "waited for. The version requests without one go to cannot be removed while "
                "others are served: roll to another first.",
                "parameters": version,
                "responses": _answers(
                    "The version removed.", _ref("ModelRemoved"), 404, 409, why=removal
                ),
            }
        },
        "/admin/models/{name}/pool": {"patch": {**pool, "parameters": [_NAME]}},
        "/admin/models/{name}/versions/{version}/pool": {"patch": {**pool, "parameters": version}},
        "/admin/models/{name}/roll": {
            "post": {
                "summary": "Send requests without a version to another version, once it has a "
                "ready worker; requests queued on the previous one finish there.",
                "parameters": [_NAME],
                "requestBody": _body("Roll"),
                "responses": _answers(
                    "The new and the previous default version.",
                    _ref("Rolled"),
                    400,
                    404,
                    503,
                    why={
                        503: "The version has no ready worker in time, or is unhealthy: "
                        "requests without a version stay where they were."
                    },
                ),
            }
        },
        "/admin/apps": {
            "get": {
                "summary": "Every application, as GET /apps lists them.",
                "responses": _answers("The applications.", _list_of("apps", "AppDescription")),
            },
            "post": {
                "summary": "Serve an application over models already served; policy state "
                "saved for the same name, policy and models is restored.",
                "requestBody": _body("AddApp"),
                "responses": _answers(
                    "The application added.",
                    _ref("AppAdded"),
                    400,
                    409,
                    status=201,
                    why={
                        400: "The body is malformed, a model is not served, the policy is "
                        "unknown or rejects the models or params.",
                        409: "An application of that name exists.",
                    },
                ),
            },
        },
        "/admin/apps/{name}": {
            "patch": {
                "summary": "Change an application's models, policy, params, slo_ms or default "
                "output; the policy keeps its state when it stays the same and can take it.",
                "parameters": [_NAME],
                "requestBody": _body("AppChange"),
                "responses": _answers(app_changed, _ref("AppChanged"), 400, 404),
            },
            "delete": {
                "summary": "Stop serving an application; its policy state is saved first.",
                "parameters": [_NAME],
                "responses": _answers("The application removed.", _ref("AppRemoved"), 404),
            },
        },
        "/admin/apps/{name}/models": {
            "post": {
                "summary": "Add a model to an application's list (at position, else last).",
                "parameters": [_NAME],
                "requestBody": _body("Link"),
                "responses": _answers(
                    app_changed,
                    _ref("AppChanged"),
                    400,
                    404,
                    409,
                    why={409: "The application already lists that model."},
                ),
            }
        },
        "/admin/apps/{name}/models/{model}": {
            "delete": {
                "summary": "Take a model off an application's list.",
                "parameters": [_NAME, _MODEL_REFERENCE],
                "responses": _answers(
                    app_changed,
                    _ref("AppChanged"),
                    400,
                    404,
                    why={
                        400: "It is the application's only model: remove the application.",
                        404: "No such application, or it does not list that model.",
                    },
                ),
            }
        },
    }


_BEARER = "bearer"
_UNAUTHORIZED_HEADERS = {
    "WWW-Authenticate": {"schema": {"type": "string"}, "description": 'Bearer realm="ketch"'}
}


def _secure(paths: dict[str, Any]) -> None:
    """Give every operation the token :class:`ketch.http.auth.TokenGuard` asks of its path, and
    the 401 it answers without it."""
    for path, operations in paths.items():
        if is_admin_path(path):
            security: list[dict[str, list[str]]] = [{_BEARER: []}]
            why = (
                "The admin token is missing or wrong, or the management API is off (the "
                "server has no admin token)."
            )
        elif path in OPEN_PATHS:
            security, why = [], ""
        else:
            security = [{}, {_BEARER: []}]
            why = (
                "The server has a predict token, and the request has neither it nor the admin "
                "token."
            )
        for operation in operations.values():
            operation["security"] = security
            if why:
                operation["responses"] = {
                    **operation["responses"],
                    "401": {
                        "description": why,
                        "headers": _UNAUTHORIZED_HEADERS,
                        "content": {_JSON: {"schema": _ERROR}},
                    },
                }


_SECURITY_SCHEMES = {
    _BEARER: {
        "type": "http",
        "scheme": "bearer",
        "description": "'Authorization: Bearer <token>'. The /admin routes need the admin token "
        "(ketch serve --admin-token or KETCH_ADMIN_TOKEN; without one the management API is "
        "off). The other routes are open unless the server has a predict token "
        "(--predict-token or KETCH_PREDICT_TOKEN): then they need it or the admin token, "
        "except the health probes, /metrics and /openapi.json.",
    }
}


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route the gateway serves."""
    paths: dict[str, Any] = {
        "/models": {
            "get": {
                "summary": "Every model version: its state, replicas, queue, batching, cache, "
                "pool, resources, runtime and tensors.",
                "responses": _answers("The models.", _list_of("models", "ModelVersion")),
            }
        },
        "/models/{name}/predict": {
            "post": {
                "summary": "Predict with a model: one input or a list of inputs.",
                "parameters": [_NAME, _TIMEOUT_HEADER],
                "requestBody": _body("PredictRequest"),
                "responses": _answers(
                    "The outputs.", _ref("PredictResponse"), 400, 404, 429, 500, 503, 504
                ),
            }
        },
        "/apps": {
            "get": {
                "summary": "Every application: its policy, models, counts and policy state.",
                "responses": _answers("The applications.", _list_of("apps", "AppDescription")),
            }
        },
        "/apps/{name}/predict": {
            "post": {
                "summary": "Ask an application: its policy picks the models and combines what "
                "they answer by its deadline.",
                "parameters": [_NAME, _TIMEOUT_HEADER],
                "requestBody": _body("AppRequest"),
                "responses": _answers(
                    "The combined output.", _ref("AppResponse"), 400, 404, 500, 503, 504
                ),
            }
        },
        "/apps/{name}/feedback": {
            "post": {
                "summary": "Teach an application's policy about a query it answered.",
                "parameters": [_NAME],
                "requestBody": _body("Feedback"),
                "responses": _answers("The rewards observed.", _ANY_OBJECT, 400, 404, 409, 500),
            }
        },
        "/v2": {
            "get": {
                "summary": "Server metadata (Open Inference Protocol).",
                "responses": _answers("Name, version and extensions.", _ANY_OBJECT),
            }
        },
        "/v2/health/live": {
            "get": {
                "summary": "Whether the gateway is up.",
                "responses": _answers("The gateway is live.", _ANY_OBJECT),
            }
        },
        "/v2/health/ready": {
            "get": {
                "summary": "Whether every model of the served file can serve.",
                "responses": {
                    **_answers("Every model can serve.", _ANY_OBJECT),
                    "503": {"description": "Some model cannot serve; they are listed."},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format).",
                "responses": {
                    "200": {
                        "description": "The metrics.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document.",
                "responses": _answers("The OpenAPI document.", _ANY_OBJECT),
            }
        },
    }
    for prefix, parameters in (
        ("/v2/models/{name}", [_NAME]),
        ("/v2/models/{name}/versions/{version}", [_NAME, _VERSION]),
    ):
        for suffix, operations in _v2_model_operations(parameters).items():
            paths[prefix + suffix] = operations
    paths.update(_admin_operations())
    _secure(paths)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ketch",
            "version": ketch.__version__,
            "description": "Models served over HTTP, batched, in worker processes. The "
            "management API under /admin changes a running server (see the bearer security "
            "scheme for the tokens).",
        },
        "paths": paths,
        "components": {
            "schemas": {**_SCHEMAS, **_ADMIN_SCHEMAS},
            "securitySchemes": _SECURITY_SCHEMES,
        },
    }
