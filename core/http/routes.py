"""The HTTP gateway: a Starlette app that turns requests into queued model inputs.

Routes:

* ``POST /models/{name}/predict`` with ``{"input": x}`` or ``{"inputs": [x, ...]}``, an
  optional ``"version"`` and an optional ``"timeout_ms"`` (or an ``X-Ketch-Timeout-Ms``
  header); answers ``{"output": y}`` or ``{"outputs": [y, ...]}`` with ``model``,
  ``version`` and ``query_id``.
* ``GET /models``: every model version with its state, replicas and queue.
* ``POST /apps/{app}/predict`` with ``{"input": x}`` (and an optional ``"timeout_ms"``):
  the application's policy picks the models and combines their answers into
  ``{"output": y, "query_id": ..., "default": false, "models": [...], ...}``.
* ``POST /apps/{app}/feedback`` with ``{"query_id": ..., "reward": r}`` (``r`` in [0, 1])
  and/or ``"label"``: the policy learns from it.
* ``GET /apps``: every application with its policy, models, counts and policy state.
* ``GET /v2/health/live`` and ``GET /v2/health/ready`` (Open Inference Protocol health);
  the rest of the protocol (``/v2``, ``/v2/models/...``) is in :mod:`ketch.http.oip`.
* ``GET /metrics`` (Prometheus, :mod:`ketch.observability.metrics`) and ``GET /openapi.json``
  (the OpenAPI document of every route, :mod:`ketch.http.openapi`).
* ``/admin/...``, the management API (:mod:`ketch.http.admin`), behind the admin token; the other
  routes need a token only when the operator sets one (:mod:`ketch.http.auth`).

Every error is JSON, ``{"error": "..."}`` plus details, with a status that says whose fault it
was: 400 bad request, 404 unknown model, 429 the model's queue is full (with
``Retry-After``), 500 the model failed (or answered what JSON cannot carry: NaN, infinity),
503 no worker could answer, 504 the request's deadline passed (its own timeout, else the
model's ``slo_ms``, else the server's request timeout). In front of every route,
:mod:`ketch.http.limits` answers 413 and 408 for bodies too large or too slow, and
:mod:`ketch.http.draining` 503 while the server stops.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

from msgspec import UNSET, UnsetType
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ketch.applications.catalog import Applications
from ketch.http import openapi
from ketch.http.admin import Admin
from ketch.http.auth import TokenGuard, Tokens
from ketch.http.deployments import DeploymentRoutes
from ketch.http.endpoints import (
    TIMEOUT_HEADER,
    Endpoints,
    Reached,
    answer_response,
    decode_body,
    internal_error,
    json_response,
    timeout_ms_of,
)
from ketch.http.limits import DEFAULT_MAX_BODY_BYTES
from ketch.http.oip import OpenInference
from ketch.http.repository import Repository
from ketch.http.shapes import AppRequest, FeedbackRequest, PredictRequest
from ketch.http.shared_memory import SharedMemoryRoutes
from ketch.http.v1 import V1Routes
from ketch.inference.shared_memory import SharedMemory
from ketch.serving.admission import Deadlines, predict
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import PredictionError


class Gateway:
    """Request handlers over one :class:`Dispatcher`.

    :param dispatcher: where requests are queued.
    :param apps: the applications (``/apps/...``).
    :param deadlines: the deadline rule of every route.
    :param admin: the management API's routes.
    :param deployments: the routes that take deploys (``/admin/deployments``).
    :param tokens: the bearer tokens the routes need.
    :param repository: Triton's model repository routes (``/v2/repository/...``).
    :param shared_memory: the system shared memory regions clients registered.
    :param max_body_bytes: the largest body, also once a compressed one is inflated.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        apps: Applications,
        deadlines: Deadlines,
        admin: Admin,
        deployments: DeploymentRoutes,
        tokens: Tokens,
        repository: Repository,
        shared_memory: SharedMemory,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.dispatcher = dispatcher
        self.apps = apps
        self.deadlines = deadlines
        self._admin = admin
        self._deployments = deployments
        self._tokens = tokens
        self._repository = repository
        self._shared_memory = shared_memory
        self._max_body_bytes = max_body_bytes
        self._openapi = openapi.document()
        self._query_ids = QueryIds()

    def app(self) -> Starlette:
        endpoints = Endpoints(
            TokenGuard(self._tokens),
            self.dispatcher.metrics,
            known_model=self.dispatcher.knows_model,
            known_app=self.apps.__contains__,
        )
        route, model_route, app_route = endpoints.route, endpoints.model_route, endpoints.app_route
        return Starlette(
            routes=[
                route("/models", self.list_models, ["GET"]),
                model_route("/models/{name}/predict", self.predict, ["POST"]),
                route("/apps", self.list_apps, ["GET"]),
                app_route("/apps/{name}/predict", self.app_predict, ["POST"]),
                route("/apps/{name}/feedback", self.app_feedback, ["POST"]),
                route("/v2/health/live", self.live, ["GET"]),
                route("/v2/health/ready", self.ready, ["GET"]),
                *OpenInference(
                    self.dispatcher, self.deadlines, self._max_body_bytes, self._shared_memory
                ).routes(endpoints),
                *SharedMemoryRoutes(self._shared_memory).routes(endpoints),
                *V1Routes(self.dispatcher, self.deadlines).routes(endpoints),
                *self._repository.routes(endpoints),
                route("/metrics", self.dispatcher.metrics.endpoint, ["GET"]),
                route("/openapi.json", self.openapi, ["GET"]),
                *self._admin.routes(endpoints),
                *self._deployments.routes(endpoints),
            ],
            # Starlette types its handlers as taking any Exception; each takes its own.
            exception_handlers={
                HTTPException: endpoints.http_error,  # type: ignore[dict-item]
                PredictionError: _prediction_error,  # type: ignore[dict-item]
                Exception: internal_error,
            },
        )

    async def predict(self, request: Request, reached: Reached) -> Response:
        name = request.path_params["name"]
        body = decode_body(await request.body(), PredictRequest)
        single, inputs = _inputs_of(body)
        version = body.version if not isinstance(body.version, int) else str(body.version)
        timeout_ms = timeout_ms_of(body.timeout_ms, request.headers.get(TIMEOUT_HEADER))
        queue = self.dispatcher.queue_for(name, version)
        reached.set(queue.spec.name, queue.spec.version)
        deadline = self.deadlines.deadline(timeout_ms, queue.spec.slo_ms)
        outputs = await predict(queue, inputs, deadline)
        answer: dict[str, Any] = {"output": outputs[0]} if single else {"outputs": outputs}
        answer["model"] = queue.spec.name
        answer["version"] = queue.spec.version
        answer["query_id"] = self._query_ids.next()
        return answer_response(answer, f"model {queue.spec.label()!r}", **queue.labels())

    async def app_predict(self, request: Request) -> Response:
        name = request.path_params["name"]
        application = self.apps.get(name)
        body = decode_body(await request.body(), AppRequest)
        if body.input is UNSET:
            raise PredictionError(
                400, "request body needs 'input': an application answers one input"
            )
        timeout_ms = timeout_ms_of(body.timeout_ms, request.headers.get(TIMEOUT_HEADER))
        answer = await application.predict(body.input, timeout_ms)
        return answer_response(answer, f"application {name!r}", app=name)

    async def app_feedback(self, request: Request) -> Response:
        application = self.apps.get(request.path_params["name"])
        body = decode_body(await request.body(), FeedbackRequest)
        query_id = body.query_id
        if not isinstance(query_id, str) or not query_id:
            query_id = None if query_id is UNSET else query_id
            raise PredictionError(
                400, f"feedback needs the 'query_id' of an answer, got {query_id!r}"
            )
        has_label = body.label is not UNSET
        if body.reward is None and not has_label:
            raise PredictionError(
                400, "feedback needs a 'reward' (a number in [0, 1]) or a 'label'"
            )
        label = body.label if has_label else None
        answer = await application.feedback(query_id, body.reward, label, has_label)
        return json_response(answer)

    async def list_apps(self, request: Request) -> Response:
        return json_response({"apps": self.apps.describe()})

    async def openapi(self, request: Request) -> Response:
        return json_response(self._openapi)

    async def list_models(self, request: Request) -> Response:
        return json_response({"models": self.dispatcher.describe()})

    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        missing = self.dispatcher.not_ready()
        if missing:
            return json_response({"ready": False, "models_not_ready": missing}, 503)
        return json_response({"ready": True})


class QueryIds:
    """The ``query_id`` of each model answer: 32 hex digits, unique across the server's life
    and its restarts (a random prefix drawn at start, then a counter), without the system call
    a ``uuid4`` costs on every request."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._count = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


def _inputs_of(body: PredictRequest) -> tuple[bool, list[Any]]:
    """``(single, inputs)``: whether the request used ``input``, and the inputs as a list."""
    has_input, has_inputs = body.input is not UNSET, body.inputs is not UNSET
    if has_input and has_inputs:
        raise PredictionError(400, "give either 'input' or 'inputs', not both")
    if has_input:
        return True, [body.input]
    if isinstance(body.inputs, UnsetType):
        raise PredictionError(
            400, "request body needs 'input' (one input) or 'inputs' (a list of inputs)"
        )
    return False, body.inputs


async def _prediction_error(request: Request, exc: PredictionError) -> Response:
    """What any handler raises (a bad body, an unknown model, a failed prediction) as its JSON
    answer: handlers raise, none catches."""
    return json_response(exc.body, exc.status, exc.headers)
