"""The management API's and the deploy routes' operations in the OpenAPI document
(:mod:`ketch.http.openapi`), every one behind the admin token."""

from __future__ import annotations

from typing import Any

from ketch.deploys.deployer import DeploymentStatus
from ketch.http import admin_shapes as admin
from ketch.http import shapes
from ketch.http.openapi_parts import (
    JSON_TYPE,
    MODEL_PARAM,
    NAME_PARAM,
    VERSION_PARAM,
    answers_of,
    request_body,
    schema_ref,
)
from ketch.planning.applied import Plan


def admin_operations() -> dict[str, dict[str, Any]]:
    """The management API (:mod:`ketch.http.admin`): every operation needs the admin token."""
    version = [NAME_PARAM, VERSION_PARAM]
    removal = {
        404: "No such model or version.",
        409: "An application links the model (or this version of it): the error lists them; "
        "or the version is the one requests without a version go to, while others are served: "
        "roll to another first.",
    }
    pool = {
        "summary": "Change a model version's pool (replica bounds, timings); the pool follows "
        "at once. Without /versions/{version}: the version requests without one get.",
        "requestBody": request_body(admin.PoolChange),
        "responses": answers_of(
            "The model version with its new pool.", schema_ref(admin.ModelChanged), 400, 404
        ),
    }
    app_changed = "The application as it serves from now on."
    return {
        "/admin/models": {
            "get": {
                "summary": "Every model version, as GET /models lists them.",
                "responses": answers_of("The models.", schema_ref(admin.ModelsList)),
            },
            "post": {
                "summary": "Serve a model from a runtime's artifact. A new version of a model "
                "already served takes no traffic until it is rolled to.",
                "requestBody": request_body(admin.AddModel),
                "responses": answers_of(
                    "The model version added.",
                    schema_ref(admin.ModelAdded),
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
                "parameters": [NAME_PARAM],
                "responses": answers_of(
                    "The versions removed.", schema_ref(admin.ModelRemoved), 404, 409, why=removal
                ),
            }
        },
        "/admin/models/{name}/versions/{version}": {
            "delete": {
                "summary": "Stop serving one version of a model; requests already queued are "
                "waited for. The version requests without one go to cannot be removed while "
                "others are served: roll to another first.",
                "parameters": version,
                "responses": answers_of(
                    "The version removed.", schema_ref(admin.ModelRemoved), 404, 409, why=removal
                ),
            }
        },
        "/admin/models/{name}/pool": {"patch": {**pool, "parameters": [NAME_PARAM]}},
        "/admin/models/{name}/versions/{version}/pool": {"patch": {**pool, "parameters": version}},
        "/admin/models/{name}/roll": {
            "post": {
                "summary": "Send requests without a version to another version, once it has a "
                "ready worker; requests queued on the previous one finish there.",
                "parameters": [NAME_PARAM],
                "requestBody": request_body(admin.Roll),
                "responses": answers_of(
                    "The new and the previous default version.",
                    schema_ref(admin.Rolled),
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
        "/admin/plan": {
            "post": {
                "summary": "Serve the models a plan sizes (the plan.json ketch plan wrote) as it "
                "plans them: batch size, delay, replicas, threads and tuner, on every version. "
                "Workers running with other threads are replaced, each once a new one is ready.",
                "requestBody": request_body(Plan),
                "responses": answers_of(
                    "Every model version the plan changed.",
                    schema_ref(admin.ModelsList),
                    400,
                    404,
                    why={
                        400: "The body is not a plan, or a model refuses a planned value; "
                        "nothing changed.",
                        404: "The plan sizes a model this server does not serve; nothing changed.",
                    },
                ),
            }
        },
        "/admin/apps": {
            "get": {
                "summary": "Every application, as GET /apps lists them.",
                "responses": answers_of("The applications.", schema_ref(admin.AppsList)),
            },
            "post": {
                "summary": "Serve an application over models already served; policy state "
                "saved for the same name, policy and models is restored.",
                "requestBody": request_body(admin.AddApp),
                "responses": answers_of(
                    "The application added.",
                    schema_ref(admin.AppAdded),
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
        "/admin/pipelines": {
            "post": {
                "summary": "Serve a pipeline over models already served; it is listed and "
                "removed as an application.",
                "requestBody": request_body(admin.AddPipeline),
                "responses": answers_of(
                    "The pipeline added.",
                    schema_ref(admin.PipelineAdded),
                    400,
                    409,
                    status=201,
                    why={
                        400: "The body is malformed, a step is not valid, or a model is not "
                        "served.",
                        409: "An application or pipeline of that name exists.",
                    },
                ),
            },
        },
        "/admin/apps/{name}": {
            "patch": {
                "summary": "Change an application's models, policy, params, slo_ms or default "
                "output; the policy keeps its state when it stays the same and can take it.",
                "parameters": [NAME_PARAM],
                "requestBody": request_body(admin.AppChange),
                "responses": answers_of(app_changed, schema_ref(admin.AppChanged), 400, 404),
            },
            "delete": {
                "summary": "Stop serving an application; its policy state is saved first.",
                "parameters": [NAME_PARAM],
                "responses": answers_of(
                    "The application removed.", schema_ref(admin.AppRemoved), 404
                ),
            },
        },
        "/admin/apps/{name}/models": {
            "post": {
                "summary": "Add a model to an application's list (at position, else last).",
                "parameters": [NAME_PARAM],
                "requestBody": request_body(admin.Link),
                "responses": answers_of(
                    app_changed,
                    schema_ref(admin.AppChanged),
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
                "parameters": [NAME_PARAM, MODEL_PARAM],
                "responses": answers_of(
                    app_changed,
                    schema_ref(admin.AppChanged),
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


def deploy_operations() -> dict[str, dict[str, Any]]:
    """Deploys (:mod:`ketch.http.deployments`): every operation needs the admin token."""
    one = "/admin/deployments/{name}"
    version = one + "/versions/{version}"
    number = {**VERSION_PARAM, "schema": {"type": "integer", "minimum": 1}}
    gone = {404: "No such deployment or version."}
    removal = {
        **gone,
        409: "A version is still deploying, answers the requests without a version while "
        "others are served (roll first), or is linked to an application.",
    }
    removed = answers_of(
        "What was removed.", schema_ref(admin.DeploymentRemoved), 404, 409, why=removal
    )
    return {
        "/admin/deployments": {
            "get": {
                "summary": "Every deployed version: its state, environment and endpoints.",
                "responses": answers_of("The deployments.", schema_ref(admin.DeploymentsList)),
            },
            "post": {
                "summary": "Deploy the archive ketch deploy packs (a gzip'd tar with "
                "ketch-deploy.json): answered at once, the build and start go on in the "
                "background.",
                "requestBody": {
                    "required": True,
                    "content": {"application/gzip": {"schema": {"type": "string"}}},
                },
                "responses": answers_of(
                    "The version it will be, building.",
                    schema_ref(DeploymentStatus),
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
                "parameters": [NAME_PARAM],
                "responses": answers_of(
                    "Its versions.", schema_ref(admin.DeploymentVersions), 404, why=gone
                ),
            },
            "delete": {
                "summary": "Stop serving every version of a deployment and forget them.",
                "parameters": [NAME_PARAM],
                "responses": removed,
            },
        },
        version: {
            "get": {
                "summary": "One deployed version, with the last lines of its log.",
                "parameters": [NAME_PARAM, number],
                "responses": answers_of(
                    "The version.", schema_ref(DeploymentStatus), 404, why=gone
                ),
            },
            "delete": {
                "summary": "Stop serving one deployed version and forget it.",
                "parameters": [NAME_PARAM, number],
                "responses": removed,
            },
        },
        version + "/log": {
            "get": {
                "summary": "A version's build log; ?follow=1 streams it until the deploy is "
                "done, ending with 'ketch: state STATE'.",
                "parameters": [
                    NAME_PARAM,
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
                        "content": {JSON_TYPE: {"schema": schema_ref(shapes.Error)}},
                    },
                },
            }
        },
    }
