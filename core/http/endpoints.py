"""How each route of the gateway is served: the token its path needs, its body read before any
answer and decoded into its shape, JSON answers, and for model and application routes, request
metrics labelled from the route itself.

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

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import numpy as np
import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ketch.http.asgi import has_body
from ketch.http.auth import TokenGuard
from ketch.http.body_errors import explain
from ketch.http.finite import first_non_finite, non_finite_name
from ketch.http.json_depth import MAX_JSON_DEPTH, deeper_than
from ketch.http.limits import linger
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

    def route(
        self, path: str, handler: Handler, methods: Sequence[str], *, streamed: bool = False
    ) -> Route:
        """A route whose body is read before ``handler`` runs, or, ``streamed``, one whose
        handler reads it as it arrives (an upload): its token is then checked first, so a
        refused upload is never read."""
        guarded = self._guard.guards(path)
        served = self._streamed(handler) if streamed else self._served(handler, guarded=guarded)
        return Route(path, served, methods=list(methods))

    def model_route(self, path: str, handler: ModelHandler, methods: Sequence[str]) -> Route:
        """A route that predicts with one model version: counted and timed under it."""
        metrics, known = self._metrics, self._known_model

        async def handle(request: Request) -> Response:
            reached = Reached()
            started = time.perf_counter()

            def done(status: int) -> None:
                seconds = time.perf_counter() - started
                if reached.model is not None and reached.version is not None:
                    metrics.request_done(reached.model, reached.version, status, seconds)
                else:
                    name = request.path_params["name"]
                    metrics.request_done(name if known(name) else "", "", status, seconds)

            return await _answered(handler(request, reached), done)

        return self.route(path, handle, methods)

    def app_route(self, path: str, handler: Handler, methods: Sequence[str]) -> Route:
        """A route that predicts with an application: counted under it."""
        metrics, known = self._metrics, self._known_app

        async def handle(request: Request) -> Response:
            def done(status: int) -> None:
                name = request.path_params["name"]
                metrics.app_request_done(name if known(name) else "", status)

            return await _answered(handler(request), done)

        return self.route(path, handle, methods)

    def _served(self, handler: Handler, *, guarded: bool) -> Handler:
        guard = self._guard

        async def endpoint(request: Request) -> Response:
            if has_body(request.scope):
                await request.body()  # read once; the handler gets it from the request
            if guarded and (why := guard.refusal(request.scope)) is not None:
                return _unauthorized(why)
            return await handler(request)

        return endpoint

    def _streamed(self, handler: Handler) -> Handler:
        guard = self._guard

        async def endpoint(request: Request) -> Response:
            if (why := guard.refusal(request.scope)) is not None:
                await linger(request.receive)  # dropped unread, so the client reads the 401
                return _unauthorized(why)
            return await handler(request)

        return endpoint

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's own errors (no route for the path, a wrong method) as JSON like all the
        others, after the token check the path's route would have made."""
        if exc.status_code in (404, 405) and has_body(request.scope):
            await request.body()  # no route read it
        if (why := self._guard.refusal(request.scope)) is not None:
            return _unauthorized(why)
        return json_response({"error": exc.detail}, exc.status_code, exc.headers)


async def _answered(answer: Awaitable[Response], done: Callable[[int], None]) -> Response:
    """The handler's answer, telling ``done`` its status: the error's for a PredictionError
    (answered by the gateway's exception handler), 503 when a stopping server cut it off
    (:mod:`ketch.http.draining`), 500 for anything else it raises."""
    status = 500
    try:
        response = await answer
        status = response.status_code
        return response
    except PredictionError as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 503
        raise
    finally:
        done(status)


def _unauthorized(why: str) -> Response:
    return json_response({"error": why}, 401, {"WWW-Authenticate": 'Bearer realm="ketch"'})


# -- JSON bodies and answers ----------------------------------------------------------------

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
    """A request body as its Struct; a 400 naming the field and the value when it is not, or
    the depth when it nests deeper than any input (:mod:`ketch.http.json_depth`)."""
    if deeper_than(raw, MAX_JSON_DEPTH):
        raise PredictionError(
            400,
            f"request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; "
            "no model input needs that many",
        )
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


def answer_response(answer: Mapping[str, Any], source: str, **details: Any) -> Response:
    """A prediction's answer as JSON; a 500 naming ``source`` (``model 'm:1'``) and where in
    the answer the trouble is, when JSON cannot carry it: a NaN or an infinity (which would be
    written ``null``, see :mod:`ketch.http.finite`) or nesting past orjson's 255 levels.

    :param details: the error body's other fields (the model's labels).
    """
    try:
        content = orjson.dumps(answer, default=_to_json_value, option=_JSON_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise PredictionError(
            500, f"the answer of {source} cannot be written as JSON: {exc}", **details
        ) from None
    if b"null" in content and (found := first_non_finite(answer)) is not None:
        path, number = found
        raise PredictionError(
            500,
            f"{source} answered {non_finite_name(number)} at '{path}', which JSON cannot carry: "
            "the answer is refused rather than sent with null there",
            **details,
        )
    return Response(content, 200, media_type="application/json")


async def internal_error(request: Request, exc: Exception) -> Response:
    """What a bug answers: JSON like every other error, its details only in the server's log
    (where Starlette's ServerErrorMiddleware sends the exception after this answer)."""
    return json_response(
        {"error": f"internal server error ({type(exc).__name__}); the server's log has more"},
        500,
    )


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
