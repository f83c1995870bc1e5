"""The OpenAPI document of the gateway, served at ``GET /openapi.json``.

The shapes of every body are generated from the msgspec Structs the routes decode and answer
(:mod:`ketch.http.shapes`, :mod:`ketch.http.oip_shapes`, :mod:`ketch.http.admin_shapes`,
:class:`ketch.serving.status.ModelStatus`), so they cannot drift from the code. What is written
here is what no type says: each operation's summary and its error statuses, in the words of
``docs/http-api.md``. Tests check that the document lists exactly the gateway's routes, and
that real answers of every route validate against it. Which routes need which bearer token is
read off :mod:`ketch.http.auth`, the guard itself.
"""

from __future__ import annotations

from typing import Any

import ketch
from ketch.http import admin_shapes as admin
from ketch.http import oip_shapes as oip
from ketch.http import repository, shapes
from ketch.http import v1_shapes as v1
from ketch.http.auth import OPEN_PATHS, is_admin_path
from ketch.http.openapi_admin import admin_operations, deploy_operations
from ketch.http.openapi_parts import (
    JSON_TYPE,
    NAME_PARAM,
    TIMEOUT_PARAM,
    VERSION_PARAM,
    answers_of,
    components,
    request_body,
    schema_ref,
)
from ketch.inference.extensions import ModelConfig, Statistics
from ketch.inference.metadata import ModelMetadata, ModelReadiness, ServerMetadata
from ketch.inference.shared_memory import RegionStatus, RegisterRequest

#: Why a load or unload can conflict.
_LINKED = {409: "An application links the model: unlink it first."}
_LOAD_ERRORS = {
    **_LINKED,
    500: "The load names model files (file: parameters), which ketch does not take; Triton "
    "answers them so.",
}


def _v1_model_operations(parameters: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """KServe V1 / TensorFlow Serving's status and predict operations of one model path."""
    return {
        "": {
            "get": {
                "summary": "Whether the model can serve (KServe V1 and TensorFlow Serving).",
                "parameters": parameters,
                "responses": {
                    **answers_of("The model is ready.", schema_ref(v1.V1ModelStatus), 404),
                    "503": {
                        "description": "The model cannot serve.",
                        "content": {JSON_TYPE: {"schema": schema_ref(v1.V1ModelStatus)}},
                    },
                },
            }
        },
        ":predict": {
            "post": {
                "summary": "Predict on instances (row format) or inputs (columnar format).",
                "parameters": [*parameters, TIMEOUT_PARAM],
                "requestBody": request_body(v1.V1PredictRequest),
                "responses": {
                    **answers_of(
                        "The predictions (for instances).",
                        {"oneOf": [schema_ref(v1.V1Predictions), schema_ref(v1.V1Outputs)]},
                        400,
                        404,
                        429,
                        500,
                        503,
                        504,
                    ),
                },
            }
        },
    }


def _v2_model_operations(parameters: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The metadata, readiness and infer operations of one model path (with or without a
    version)."""
    return {
        "": {
            "get": {
                "summary": "A model's metadata: versions, platform, input and output tensors.",
                "parameters": parameters,
                "responses": answers_of("The model's metadata.", schema_ref(ModelMetadata), 404),
            }
        },
        "/ready": {
            "get": {
                "summary": "Whether the model can serve (now, or by starting a worker).",
                "parameters": parameters,
                "responses": {
                    **answers_of("The model is ready.", schema_ref(ModelReadiness), 404),
                    "503": {"description": "The model is unhealthy."},
                },
            }
        },
        "/config": {
            "get": {
                "summary": "The model's configuration, as Triton's model configuration "
                "extension describes a model.",
                "parameters": parameters,
                "responses": answers_of("The configuration.", schema_ref(ModelConfig), 404),
            }
        },
        "/stats": {
            "get": {
                "summary": "The statistics of the model's versions, or of one version "
                "(Triton's statistics extension).",
                "parameters": parameters,
                "responses": answers_of("Counts and durations.", schema_ref(Statistics), 404),
            }
        },
        "/infer": {
            "post": {
                "summary": "Inference on tensors (Open Inference Protocol); the first "
                "dimension of each input is the batch.",
                "parameters": parameters,
                "requestBody": request_body(oip.InferRequest),
                "responses": answers_of(
                    "The output tensors.",
                    schema_ref(oip.InferResponse),
                    400,
                    404,
                    429,
                    500,
                    503,
                    504,
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
                        "content": {JSON_TYPE: {"schema": schema_ref(shapes.Error)}},
                    },
                }


_TOO_LARGE = (
    "The request body is larger than the server takes (ketch serve --max-body-mb, 64 MiB by "
    "default); the error names the limit."
)
_TOO_SLOW = (
    "The request body did not arrive within the server's read timeout (ketch serve "
    "--read-timeout, 30 s by default)."
)
_STOPPING = (
    "The server is shutting down: the request arrived after SIGINT or SIGTERM, or was still "
    "running at the end of the grace period (ketch serve --shutdown-grace). Send it again, to "
    "another server or to this one once it is back, after the Retry-After header's seconds."
)
_STOPPING_TOO = _STOPPING[0].lower() + _STOPPING[1:]
_RETRY_AFTER_HEADERS = {
    "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}
}


def _bounded(paths: dict[str, Any]) -> None:
    """Give every operation the answers of the layers in front of its route
    (:mod:`ketch.http.limits`, :mod:`ketch.http.draining`): 413 and 408 where it takes a
    body, and the 503 of a stopping server, beside any 503 of its own."""
    error = {JSON_TYPE: {"schema": schema_ref(shapes.Error)}}
    for operations in paths.values():
        for operation in operations.values():
            # Operations may share their answers (a model's pool with and without version).
            responses = dict(operation["responses"])
            if "requestBody" in operation:
                responses["413"] = {"description": _TOO_LARGE, "content": error}
                responses["408"] = {"description": _TOO_SLOW, "content": error}
            own = responses.get("503")
            stopping: dict[str, Any] = {"description": _STOPPING, "headers": _RETRY_AFTER_HEADERS}
            if own is None:
                stopping["content"] = error
            else:
                stopping["description"] = f"{own['description']} Or: {_STOPPING_TOO}"
                # An own 503 of another shape: either shape; one of no stated shape stays so.
                own_schema = own.get("content", {}).get(JSON_TYPE, {}).get("schema")
                if own_schema is not None:
                    schema = schema_ref(shapes.Error)
                    if own_schema != schema:
                        schema = {"anyOf": [own_schema, schema]}
                    stopping["content"] = {JSON_TYPE: {"schema": schema}}
            responses["503"] = stopping
            operation["responses"] = responses


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


def _shared_memory_operations() -> dict[str, dict[str, Any]]:
    """Triton's system and CUDA shared memory extensions."""
    region = {"name": "region", "in": "path", "required": True, "schema": {"type": "string"}}
    regions = {"type": "array", "items": schema_ref(RegionStatus)}
    done = {"type": "object"}
    paths: dict[str, dict[str, Any]] = {}
    for kind, which in (("system", "systemsharedmemory"), ("CUDA", "cudasharedmemory")):
        prefix = f"/v2/{which}"
        status_of = f"The {kind} shared memory regions registered"
        paths[f"{prefix}/status"] = {
            "get": {"summary": f"{status_of}.", "responses": answers_of("The regions.", regions)}
        }
        paths[f"{prefix}/region/{{region}}/status"] = {
            "get": {
                "summary": f"{status_of}: one of them.",
                "parameters": [region],
                "responses": answers_of("The region.", regions, 400),
            }
        }
        paths[f"{prefix}/unregister"] = {
            "post": {
                "summary": f"Unregister every {kind} shared memory region.",
                "responses": answers_of("Unregistered.", done),
            }
        }
        paths[f"{prefix}/region/{{region}}/unregister"] = {
            "post": {
                "summary": f"Unregister a {kind} shared memory region (unknown: no error).",
                "parameters": [region],
                "responses": answers_of("Unregistered.", done),
            }
        }
    paths["/v2/systemsharedmemory/region/{region}/register"] = {
        "post": {
            "summary": "Register a POSIX shared memory object (its shm_open name, an offset "
            "and a size) as a region inputs are read from and outputs written to.",
            "parameters": [region],
            "requestBody": request_body(RegisterRequest),
            "responses": answers_of(
                "Registered.", done, 400, 409, why={409: "A region of that name is registered."}
            ),
        }
    }
    paths["/v2/cudasharedmemory/region/{region}/register"] = {
        "post": {
            "summary": "Refused: ketch hands clients no GPU memory (a 400 that says so).",
            "parameters": [region],
            "responses": answers_of("Never.", done, 400),
        }
    }
    return paths


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route the gateway serves."""
    paths: dict[str, Any] = {
        "/models": {
            "get": {
                "summary": "Every model version: its state, replicas, queue, batching, cache, "
                "pool, resources, runtime and tensors.",
                "responses": answers_of("The models.", schema_ref(admin.ModelsList)),
            }
        },
        "/models/{name}/predict": {
            "post": {
                "summary": "Predict with a model: one input or a list of inputs.",
                "parameters": [NAME_PARAM, TIMEOUT_PARAM],
                "requestBody": request_body(shapes.PredictRequest),
                "responses": answers_of(
                    "The outputs.", schema_ref(shapes.PredictAnswer), 400, 404, 429, 500, 503, 504
                ),
            }
        },
        "/apps": {
            "get": {
                "summary": "Every application (its policy, models, counts and policy state) "
                "and pipeline (its steps, counts and latencies).",
                "responses": answers_of("The applications.", schema_ref(admin.AppsList)),
            }
        },
        "/apps/{name}/predict": {
            "post": {
                "summary": "Ask an application (its policy picks the models and combines what "
                "they answer by its deadline) or a pipeline (its steps in turn).",
                "parameters": [NAME_PARAM, TIMEOUT_PARAM],
                "requestBody": request_body(shapes.AppRequest),
                "responses": answers_of(
                    "The combined output, or the pipeline's.",
                    {"oneOf": [schema_ref(shapes.AppAnswer), schema_ref(shapes.PipelineAnswer)]},
                    400,
                    404,
                    429,
                    500,
                    503,
                    504,
                ),
            }
        },
        "/apps/{name}/feedback": {
            "post": {
                "summary": "Teach an application's policy about a query it answered.",
                "parameters": [NAME_PARAM],
                "requestBody": request_body(shapes.FeedbackRequest),
                "responses": answers_of(
                    "The rewards observed.", schema_ref(shapes.FeedbackAnswer), 400, 404, 409, 500
                ),
            }
        },
        "/v2": {
            "get": {
                "summary": "Server metadata (Open Inference Protocol).",
                "responses": answers_of(
                    "Name, version and extensions.", schema_ref(ServerMetadata)
                ),
            }
        },
        "/v2/repository/index": {
            "post": {
                "summary": "Every model version the server knows, loaded or not (Triton's "
                "model repository extension).",
                "responses": answers_of(
                    "The models.", {"type": "array", "items": schema_ref(repository.IndexEntry)}
                ),
            }
        },
        "/v2/repository/models/{name}/load": {
            "post": {
                "summary": "Load a model back, with an optional config override (needs "
                "--model-control explicit).",
                "parameters": [NAME_PARAM],
                "responses": answers_of(
                    "Loaded.", {"type": "object"}, 400, 404, 409, 500, why=_LOAD_ERRORS
                ),
            }
        },
        "/v2/repository/models/{name}/unload": {
            "post": {
                "summary": "Take a model's versions out of service (needs --model-control "
                "explicit).",
                "parameters": [NAME_PARAM],
                "responses": answers_of(
                    "Unloaded.", {"type": "object"}, 400, 404, 409, why=_LINKED
                ),
            }
        },
        "/v2/models/stats": {
            "get": {
                "summary": "Every served model version's statistics (Triton's extension).",
                "responses": answers_of("Counts and durations.", schema_ref(Statistics)),
            }
        },
        "/v2/health/live": {
            "get": {
                "summary": "Whether the gateway is up.",
                "responses": answers_of("The gateway is live.", schema_ref(shapes.Live)),
            }
        },
        "/v2/health/ready": {
            "get": {
                "summary": "Whether every model of the served file can serve.",
                "responses": {
                    **answers_of("Every model can serve.", schema_ref(shapes.Ready)),
                    "503": {
                        "description": "Some model cannot serve; they are listed.",
                        "content": {JSON_TYPE: {"schema": schema_ref(shapes.Ready)}},
                    },
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
                "responses": answers_of("The OpenAPI document.", {"type": "object"}),
            }
        },
    }
    for prefix, parameters in (
        ("/v2/models/{name}", [NAME_PARAM]),
        ("/v2/models/{name}/versions/{version}", [NAME_PARAM, VERSION_PARAM]),
    ):
        for suffix, operations in _v2_model_operations(parameters).items():
            paths[prefix + suffix] = operations
    for prefix, parameters in (
        ("/v1/models/{name}", [NAME_PARAM]),
        ("/v1/models/{name}/versions/{version}", [NAME_PARAM, VERSION_PARAM]),
    ):
        for suffix, operations in _v1_model_operations(parameters).items():
            paths[prefix + suffix] = operations
    paths.update(_shared_memory_operations())
    paths.update(admin_operations())
    paths.update(deploy_operations())
    _bounded(paths)
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
            "schemas": components(),
            "securitySchemes": _SECURITY_SCHEMES,
        },
    }
