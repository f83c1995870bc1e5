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

import msgspec

import ketch
from ketch.deploys.deployer import DeploymentStatus
from ketch.http import admin_shapes as admin
from ketch.http import oip_shapes as oip
from ketch.http import shapes
from ketch.http.auth import OPEN_PATHS, is_admin_path
from ketch.inference.extensions import ModelConfig, Statistics
from ketch.inference.metadata import ModelMetadata, ModelReadiness, ServerMetadata

_JSON = "application/json"
_REF = "#/components/schemas/{name}"
#: Every Struct a reference was made to while the document was built: its components.
_REFERENCED: dict[str, type[msgspec.Struct]] = {}
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


def _body(shape: type[msgspec.Struct]) -> dict[str, Any]:
    return {"required": True, "content": {_JSON: {"schema": _ref(shape)}}}


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
            "content": {_JSON: {"schema": _ref(shapes.Error)}},
        }
    return answers


def _ref(shape: type[msgspec.Struct]) -> dict[str, Any]:
    _REFERENCED[shape.__name__] = shape
    return {"$ref": _REF.format(name=shape.__name__)}


def _components() -> dict[str, Any]:
    """The JSON Schema of every Struct referenced, and of the Structs they hold."""
    _, schemas = msgspec.json.schema_components(_REFERENCED.values(), ref_template=_REF)
    return schemas


def _v2_model_operations(parameters: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The metadata, readiness and infer operations of one model path (with or without a
    version)."""
    return {
        "": {
            "get": {
                "summary": "A model's metadata: versions, platform, input and output tensors.",
                "parameters": parameters,
                "responses": _answers("The model's metadata.", _ref(ModelMetadata), 404),
            }
        },
        "/ready": {
            "get": {
                "summary": "Whether the model can serve (now, or by starting a worker).",
                "parameters": parameters,
                "responses": {
                    **_answers("The model is ready.", _ref(ModelReadiness), 404),
                    "503": {"description": "The model is unhealthy."},
                },
            }
        },
        "/config": {
            "get": {
                "summary": "The model's configuration, as Triton's model configuration "
                "extension describes a model.",
                "parameters": parameters,
                "responses": _answers("The configuration.", _ref(ModelConfig), 404),
            }
        },
        "/stats": {
            "get": {
                "summary": "The statistics of the model's versions, or of one version "
                "(Triton's statistics extension).",
                "parameters": parameters,
                "responses": _answers("Counts and durations.", _ref(Statistics), 404),
            }
        },
        "/infer": {
            "post": {
                "summary": "Inference on tensors (Open Inference Protocol); the first "
                "dimension of each input is the batch.",
                "parameters": parameters,
                "requestBody": _body(oip.InferRequest),
                "responses": _answers(
                    "The output tensors.", _ref(oip.InferResponse), 400, 404, 429, 500, 503, 504
                ),
            }
        },
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
        "at once. Without /versions/{version}: the version requests without one get.",
        "requestBody": _body(admin.PoolChange),
        "responses": _answers(
            "The model version with its new pool.", _ref(admin.ModelChanged), 400, 404
        ),
    }
    app_changed = "The application as it serves from now on."
    return {
        "/admin/models": {
            "get": {
                "summary": "Every model version, as GET /models lists them.",
                "responses": _answers("The models.", _ref(admin.ModelsList)),
            },
            "post": {
                "summary": "Serve a model from a runtime's artifact. A new version of a model "
                "already served takes no traffic until it is rolled to.",
                "requestBody": _body(admin.AddModel),
                "responses": _answers(
                    "The model version added.",
                    _ref(admin.ModelAdded),
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
                    "The versions removed.", _ref(admin.ModelRemoved), 404, 409, why=removal
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
                    "The version removed.", _ref(admin.ModelRemoved), 404, 409, why=removal
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
                "requestBody": _body(admin.Roll),
                "responses": _answers(
                    "The new and the previous default version.",
                    _ref(admin.Rolled),
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
                "responses": _answers("The applications.", _ref(admin.AppsList)),
            },
            "post": {
                "summary": "Serve an application over models already served; policy state "
                "saved for the same name, policy and models is restored.",
                "requestBody": _body(admin.AddApp),
                "responses": _answers(
                    "The application added.",
                    _ref(admin.AppAdded),
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
                "requestBody": _body(admin.AppChange),
                "responses": _answers(app_changed, _ref(admin.AppChanged), 400, 404),
            },
            "delete": {
                "summary": "Stop serving an application; its policy state is saved first.",
                "parameters": [_NAME],
                "responses": _answers("The application removed.", _ref(admin.AppRemoved), 404),
            },
        },
        "/admin/apps/{name}/models": {
            "post": {
                "summary": "Add a model to an application's list (at position, else last).",
                "parameters": [_NAME],
                "requestBody": _body(admin.Link),
                "responses": _answers(
                    app_changed,
                    _ref(admin.AppChanged),
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
                    _ref(admin.AppChanged),
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
                        "content": {_JSON: {"schema": _ref(shapes.Error)}},
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
    error = {_JSON: {"schema": _ref(shapes.Error)}}
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
                own_schema = own.get("content", {}).get(_JSON, {}).get("schema")
                if own_schema is not None:
                    schema = _ref(shapes.Error)
                    if own_schema != schema:
                        schema = {"anyOf": [own_schema, schema]}
                    stopping["content"] = {_JSON: {"schema": schema}}
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


def _deploy_operations() -> dict[str, dict[str, Any]]:
    """Deploys (:mod:`ketch.http.deployments`): every operation needs the admin token."""
    one = "/admin/deployments/{name}"
    version = one + "/versions/{version}"
    number = {**_VERSION, "schema": {"type": "integer", "minimum": 1}}
    gone = {404: "No such deployment or version."}
    removal = {
        **gone,
        409: "A version is still deploying, answers the requests without a version while "
        "others are served (roll first), or is linked to an application.",
    }
    removed = _answers("What was removed.", _ref(admin.DeploymentRemoved), 404, 409, why=removal)
    return {
        "/admin/deployments": {
            "get": {
                "summary": "Every deployed version: its state, environment and endpoints.",
                "responses": _answers("The deployments.", _ref(admin.DeploymentsList)),
            },
            "post": {
                "summary": "Deploy the archive ketch deploy packs (a gzip'd tar with "
                "ketch-deploy.json): answered at once, the build and start go on in the "
                "background.",
                "requestBody": {
                    "required": True,
                    "content": {"application/gzip": {"schema": {"type": "string"}}},
                },
                "responses": _answers(
                    "The version it will be, building.",
                    _ref(DeploymentStatus),
                    400,
                    408,
                    413,
                    status=202,
                    why={
                        400: "The archive is unsafe (a link, a path out of its folder) or its "
                        "manifest is wrong; the error names the member.",
                        408: "The upload paused longer than the read timeout.",
                        413: "The archive, or what it unpacks to, is over --max-deploy-mb.",
                    },
                ),
            },
        },
        one: {
            "get": {
                "summary": "One deployment's versions.",
                "parameters": [_NAME],
                "responses": _answers(
                    "Its versions.", _ref(admin.DeploymentVersions), 404, why=gone
                ),
            },
            "delete": {
                "summary": "Stop serving every version of a deployment and forget them.",
                "parameters": [_NAME],
                "responses": removed,
            },
        },
        version: {
            "get": {
                "summary": "One deployed version, with the last lines of its log.",
                "parameters": [_NAME, number],
                "responses": _answers("The version.", _ref(DeploymentStatus), 404, why=gone),
            },
            "delete": {
                "summary": "Stop serving one deployed version and forget it.",
                "parameters": [_NAME, number],
                "responses": removed,
            },
        },
        version + "/log": {
            "get": {
                "summary": "A version's build log; ?follow=1 streams it until the deploy is "
                "done, ending with 'ketch: state STATE'.",
                "parameters": [
                    _NAME,
                    number,
                    {"name": "follow", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "The log.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "404": {
                        "description": gone[404],
                        "content": {_JSON: {"schema": _ref(shapes.Error)}},
                    },
                },
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
                "responses": _answers("The models.", _ref(admin.ModelsList)),
            }
        },
        "/models/{name}/predict": {
            "post": {
                "summary": "Predict with a model: one input or a list of inputs.",
                "parameters": [_NAME, _TIMEOUT_HEADER],
                "requestBody": _body(shapes.PredictRequest),
                "responses": _answers(
                    "The outputs.", _ref(shapes.PredictAnswer), 400, 404, 429, 500, 503, 504
                ),
            }
        },
        "/apps": {
            "get": {
                "summary": "Every application: its policy, models, counts and policy state.",
                "responses": _answers("The applications.", _ref(admin.AppsList)),
            }
        },
        "/apps/{name}/predict": {
            "post": {
                "summary": "Ask an application: its policy picks the models and combines what "
                "they answer by its deadline.",
                "parameters": [_NAME, _TIMEOUT_HEADER],
                "requestBody": _body(shapes.AppRequest),
                "responses": _answers(
                    "The combined output.", _ref(shapes.AppAnswer), 400, 404, 500, 503, 504
                ),
            }
        },
        "/apps/{name}/feedback": {
            "post": {
                "summary": "Teach an application's policy about a query it answered.",
                "parameters": [_NAME],
                "requestBody": _body(shapes.FeedbackRequest),
                "responses": _answers(
                    "The rewards observed.", _ref(shapes.FeedbackAnswer), 400, 404, 409, 500
                ),
            }
        },
        "/v2": {
            "get": {
                "summary": "Server metadata (Open Inference Protocol).",
                "responses": _answers("Name, version and extensions.", _ref(ServerMetadata)),
            }
        },
        "/v2/models/stats": {
            "get": {
                "summary": "Every served model version's statistics (Triton's extension).",
                "responses": _answers("Counts and durations.", _ref(Statistics)),
            }
        },
        "/v2/health/live": {
            "get": {
                "summary": "Whether the gateway is up.",
                "responses": _answers("The gateway is live.", _ref(shapes.Live)),
            }
        },
        "/v2/health/ready": {
            "get": {
                "summary": "Whether every model of the served file can serve.",
                "responses": {
                    **_answers("Every model can serve.", _ref(shapes.Ready)),
                    "503": {
                        "description": "Some model cannot serve; they are listed.",
                        "content": {_JSON: {"schema": _ref(shapes.Ready)}},
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
                "responses": _answers("The OpenAPI document.", {"type": "object"}),
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
    paths.update(_deploy_operations())
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
            "schemas": _components(),
            "securitySchemes": _SECURITY_SCHEMES,
        },
    }
