"""How each route of the gateway is served: the token its path needs, its body read before any
answer, and for model and application routes, request metrics labelled from the route itself.

Reading the body first keeps keep-alive connections usable: an HTTP/1.1 server reads the next
request on a connection only once this one's body is read, so an answer given from the path or
headers alone (a refused token, an unknown model, a wrong method) would leave the server to
close the connection under the client's next request.

The model routes (``/models/{name}/predict`` and the Open Inference Protocol's ``infer``) get a
:class:`Reached` to fill in once they know the model version a request reached: its counts and
latency are labelled with that version, or with the model's name alone when the request failed
before one was chosen (and with no name for a model the server does not know, so that made-up
names cannot grow the metrics without bound).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from ketch.http.auth import TokenGuard
from ketch.http.json_io import json_response
from ketch.observability.metrics import Metrics
from ketch.serving.jobs import PredictionError

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(slots=True)
class Reached:
    """The model version a model request reached, once its handler has found it."""

    model: str | None = None
    version: str | None = None

    def set(self, model: str, version: str) -> None:
        self.model, self.version = model, version


ModelHandler = Callable[[Request, Reached], Awaitable[Response]]


class Endpoints:
    """Builds the gateway's routes (see the module docstring).

    :param guard: the bearer tokens each path needs.
    :param metrics: where model and application requests are counted and timed.
    :param known_model: whether the server serves a model of this name.
    :param known_app: whether the server serves an application of this name.
    """

    def __init__(
        self,
        guard: TokenGuard,
        metrics: Metrics,
        known_model: Callable[[str], bool],
        known_app: Callable[[str], bool],
    ) -> None:
        self._guard = guard
        self._metrics = metrics
        self._known_model = known_model
        self._known_app = known_app

    def route(self, path: str, handler: Handler, methods: Sequence[str]) -> Route:
        return Route(path, self._guarded(handler), methods=list(methods))

    def model_route(self, path: str, handler: ModelHandler, methods: Sequence[str]) -> Route:
        """A route that predicts with one model version: counted and timed under it."""
        metrics, known = self._metrics, self._known_model

        async def handle(request: Request) -> Response:
            reached = Reached()
            started = time.perf_counter()
            status = 500  # unless it answers: Starlette then answers 500
            try:
                response = await handler(request, reached)
                status = response.status_code
                return response
            except PredictionError as exc:
                status = exc.status
                raise
            finally:
                seconds = time.perf_counter() - started
                if reached.model is not None and reached.version is not None:
                    metrics.request_done(reached.model, reached.version, status, seconds)
                else:
                    name = request.path_params["name"]
                    metrics.request_done(name if known(name) else "", "", status, seconds)

        return self.route(path, handle, methods)

    def app_route(self, path: str, handler: Handler, methods: Sequence[str]) -> Route:
        """A route that predicts with an application: counted under it."""
        metrics, known = self._metrics, self._known_app

        async def handle(request: Request) -> Response:
            status = 500
            try:
                response = await handler(request)
                status = response.status_code
                return response
            except PredictionError as exc:
                status = exc.status
                raise
            finally:
                name = request.path_params["name"]
                metrics.app_request_done(name if known(name) else "", status)

        return self.route(path, handle, methods)

    def _guarded(self, handler: Handler) -> Handler:
        guard = self._guard

        async def endpoint(request: Request) -> Response:
            if has_body(request.scope):
                await request.body()  # read once; the handler gets it from the request
            refusal = guard.refusal(request.scope)
            if refusal is not None:
                return refusal
            return await handler(request)

        return endpoint

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's own errors (no route for the path, a wrong method) as JSON like all the
        others, after the token check the path's route would have made."""
        if exc.status_code in (404, 405) and has_body(request.scope):
            await request.body()  # no route read it
        refusal = self._guard.refusal(request.scope)
        if refusal is not None:
            return refusal
        return json_response({"error": exc.detail}, exc.status_code, exc.headers)


def has_body(scope: Scope) -> bool:
    """Whether the request announces a body (a length above 0, or chunks)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False
