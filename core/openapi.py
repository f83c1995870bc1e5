"""The OpenAPI document of the gateway, served at ``GET /openapi.json``.

Written out by hand rather than generated from docstrings: each operation says what it takes
and what it answers, in the words of ``docs/http-api.md``. A test checks that the document and
the gateway's routes list the same paths and methods, so neither drifts from the other.
"""

from __future__ import annotations

from typing import Any

import ketch

_JSON = "application/json"
_ERROR = {"$ref": "#/components/schemas/Error"}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
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


def _body(schema: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {_JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _answers(description: str, schema: dict[str, Any], *errors: int) -> dict[str, Any]:
    """``200`` with ``schema``, and each error status with the JSON error body."""
    answers: dict[str, Any] = {
        "200": {"description": description, "content": {_JSON: {"schema": schema}}}
    }
    reasons = {
        400: "The request is malformed; the error names what is wrong.",
        404: "No such model, version or application.",
        409: "The query already had its feedback.",
        429: "The model's queue is full; retry after the Retry-After header's seconds.",
        500: "The model or the application's policy failed.",
        503: "No worker could answer, or the model is unhealthy.",
        504: "The request's deadline passed.",
    }
    for status in errors:
        answers[str(status)] = {
            "description": reasons[status],
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


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route the gateway serves."""
    paths: dict[str, Any] = {
        "/models": {
            "get": {
                "summary": "Every model version: its state, replicas, queue, batching, cache, "
                "pool, resources, runtime and tensors.",
                "responses": _answers("The models.", _ANY_OBJECT),
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
                "responses": _answers("The applications.", _ANY_OBJECT),
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
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ketch",
            "version": ketch.__version__,
            "description": "Models served over HTTP, batched, in worker processes.",
        },
        "paths": paths,
        "components": {"schemas": _SCHEMAS},
    }
