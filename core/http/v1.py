"""KServe V1 and TensorFlow Serving's REST API, for clients written against them.

* ``POST /v1/models/{name}[/versions/{version}]:predict`` with ``{"instances": [...]}`` (one
  input per instance) answers ``{"predictions": [...]}``; with ``{"inputs": ...}`` (the
  columnar format: a list along the batch, or ``{"name": list, ...}`` for named inputs)
  answers ``{"outputs": ...}`` in the same format (named outputs as ``{"name": list}``).
* ``GET /v1/models/{name}[/versions/{version}]``: whether it can serve, as KServe V1 says it
  (``name``, ``ready``) and as TensorFlow Serving does (``model_version_status``).

Each instance is one input of the model, as one element of ``inputs`` on
``/models/{name}/predict`` is: the same queue, batching, cache, deadline (``X-Ketch-Timeout-Ms``)
and errors (``{"error": "..."}``, which is TensorFlow Serving's error body too).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from msgspec import UNSET, UnsetType
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ketch.http.endpoints import (
    TIMEOUT_HEADER,
    Endpoints,
    Reached,
    answer_response,
    decode_body,
    json_response,
    timeout_ms_of,
)
from ketch.http.v1_shapes import V1ModelStatus, V1PredictRequest, V1VersionStatus
from ketch.serving.admission import Deadlines, predict
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import PredictionError
from ketch.serving.queue import ModelQueue
from ketch.serving.status import ready_to_serve


class V1Routes:
    """The V1 handlers over one :class:`Dispatcher` (see the module's docstring)."""

    def __init__(self, dispatcher: Dispatcher, deadlines: Deadlines) -> None:
        self.dispatcher = dispatcher
        self.deadlines = deadlines

    def routes(self, endpoints: Endpoints) -> list[Route]:
        routes = []
        for model in ("/v1/models/{name}", "/v1/models/{name}/versions/{version}"):
            routes += [
                endpoints.model_route(f"{model}:predict", self.predict, ["POST"]),
                endpoints.route(model, self.status, ["GET"]),
            ]
        return routes

    async def status(self, request: Request) -> Response:
        queue = self._queue(request)
        ready = ready_to_serve(queue)
        version = V1VersionStatus(
            version=queue.spec.version,
            state="AVAILABLE" if ready else "UNAVAILABLE",
            status={"error_code": "OK", "error_message": ""}
            if ready
            else {"error_code": "UNAVAILABLE", "error_message": queue.last_error or ""},
        )
        answer = V1ModelStatus(name=queue.spec.name, ready=ready, model_version_status=[version])
        return json_response(answer, 200 if ready else 503)

    async def predict(self, request: Request, reached: Reached) -> Response:
        queue = self._queue(request)
        reached.set(queue.spec.name, queue.spec.version)
        body = decode_body(await request.body(), V1PredictRequest)
        rows = not isinstance(body.instances, UnsetType)
        if rows == (body.inputs is not UNSET):
            raise PredictionError(
                400, "the request body needs exactly one of 'instances' and 'inputs'"
            )
        items = body.instances if not isinstance(body.instances, UnsetType) else None
        if items is None:
            items = _columns_to_items(body.inputs)
        timeout_ms = timeout_ms_of(None, request.headers.get(TIMEOUT_HEADER))
        deadline = self.deadlines.deadline(timeout_ms, queue.spec.slo_ms)
        outputs = list(await predict(queue, items, deadline))
        answer = {"predictions": outputs} if rows else {"outputs": _items_to_columns(outputs)}
        return answer_response(answer, f"model {queue.spec.label()!r}", **queue.labels())

    def _queue(self, request: Request) -> ModelQueue:
        return self.dispatcher.queue_for(
            request.path_params["name"], request.path_params.get("version")
        )


def _columns_to_items(inputs: Any) -> list[Any]:
    """The columnar format's inputs as one item each: a list is the batch itself; named
    inputs (each a list along the batch, of one length) become ``{name: row}`` items."""
    if isinstance(inputs, list):
        if not inputs:
            raise PredictionError(400, "'inputs' is an empty list: send at least one input")
        return inputs
    if isinstance(inputs, Mapping) and inputs:
        lengths = {
            name: len(column) if isinstance(column, list) else None
            for name, column in inputs.items()
        }
        if None in lengths.values() or len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise PredictionError(
                400,
                "named 'inputs' must each be a non-empty list along the batch, of one length; "
                f"got lengths {lengths}",
            )
        (size,) = set(lengths.values())
        return [{name: column[i] for name, column in inputs.items()} for i in range(size or 0)]
    raise PredictionError(
        400,
        "'inputs' must be a list (the batch) or an object of named lists, got "
        f"{type(inputs).__name__}",
    )


def _items_to_columns(outputs: list[Any]) -> Any:
    """Outputs back in the columnar format: named outputs as ``{name: list}``."""
    if outputs and all(isinstance(o, Mapping) for o in outputs):
        return {name: [o.get(name) for o in outputs] for name in outputs[0]}
    return outputs
