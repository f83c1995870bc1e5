"""The Open Inference Protocol (KServe V2) over REST, on top of :mod:`ketch.inference`.

Routes (errors are ``{"error": "..."}`` with a 4xx/5xx status, as on ketch's own routes):

* ``GET /v2``: server metadata.
* ``GET /v2/models/{name}[/versions/{version}]``: the model's tensors, with the batch axis.
* ``GET /v2/models/{name}[/versions/{version}]/ready``: 200, or 503 when it cannot serve.
* ``POST /v2/models/{name}[/versions/{version}]/infer``: one request's tensors in, one
  response's tensors out (:mod:`ketch.inference.calls` says how they become items).
* Triton's extensions (:mod:`ketch.inference.extensions`):
  ``GET /v2/models/{name}[/versions/{version}]/config``, the model's configuration, and
  ``GET /v2/models[/{name}[/versions/{version}]]/stats``, its statistics.

Tensors travel as JSON, or as binary data after the JSON (Triton's binary tensor data
extension, ``Inference-Header-Content-Length``): inputs when the client sends them so, outputs
when it asks (``"binary_data": true`` on an output, or ``"binary_data_output": true`` on the
request). An output holding NaN or infinity cannot be JSON: it is a 500 unless it goes binary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import numpy as np
from msgspec import UNSET, UnsetType
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ketch.http.compression import chosen_encoding, compressed, inflated
from ketch.http.endpoints import (
    TIMEOUT_HEADER,
    Endpoints,
    Reached,
    answer_response,
    decode_body,
    json_response,
    timeout_ms_of,
)
from ketch.http.finite import non_finite_name
from ketch.http.oip_shapes import InferRequest
from ketch.inference.calls import (
    InferCall,
    OutputTensor,
    class_count_of,
    infer,
    model_parameters,
    timeout_ms_of_parameters,
)
from ketch.inference.extensions import model_config, statistics
from ketch.inference.metadata import ModelReadiness, model_metadata, server_metadata
from ketch.inference.shared_memory import (
    BYTE_SIZE,
    OFFSET,
    REGION,
    Placement,
    SharedMemory,
    placement_of,
)
from ketch.inference.tensors import (
    FLOAT_DTYPES,
    tensor_from_binary,
    tensor_from_json,
    tensor_to_binary,
)
from ketch.serving.admission import Deadlines
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import PredictionError
from ketch.serving.queue import ModelQueue

#: Set by clients sending binary tensors after the JSON header (Triton's extension), and on
#: answers that carry binary outputs.
BINARY_HEADER = "inference-header-content-length"


class OpenInference:
    """The V2 handlers over one :class:`Dispatcher` (see the module's docstring)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        deadlines: Deadlines,
        max_body_bytes: int,
        shared_memory: SharedMemory,
    ) -> None:
        self.dispatcher = dispatcher
        self.deadlines = deadlines
        #: What a compressed request may inflate to (the limit of any body).
        self.max_body_bytes = max_body_bytes
        #: The regions that inputs are read from and outputs written to, when placed there.
        self.shared_memory = shared_memory

    def routes(self, endpoints: Endpoints) -> list[Route]:
        routes = [
            endpoints.route("/v2", self.server_metadata, ["GET"]),
            # Before /v2/models/{name}: "stats" is this route, as it is in Triton.
            endpoints.route("/v2/models/stats", self.statistics, ["GET"]),
        ]
        for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [
                endpoints.route(model, self.model_metadata, ["GET"]),
                endpoints.route(f"{model}/ready", self.model_ready, ["GET"]),
                endpoints.route(f"{model}/config", self.model_config, ["GET"]),
                endpoints.route(f"{model}/stats", self.statistics, ["GET"]),
                endpoints.model_route(f"{model}/infer", self.infer, ["POST"]),
            ]
        return routes

    async def server_metadata(self, request: Request) -> Response:
        return json_response(server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        return json_response(model_metadata(self.dispatcher, self._queue(request)))

    async def model_ready(self, request: Request) -> Response:
        queue = self._queue(request)
        ready = ModelReadiness.of(queue)
        return json_response(ready, 200 if ready.ready else 503)

    async def model_config(self, request: Request) -> Response:
        return json_response(model_config(self._queue(request)))

    async def statistics(self, request: Request) -> Response:
        params = request.path_params
        return json_response(statistics(self.dispatcher, params.get("name"), params.get("version")))

    async def infer(self, request: Request, reached: Reached) -> Response:
        queue = self._queue(request)
        # Known from the path: even a request failing below is counted under this version.
        reached.set(queue.spec.name, queue.spec.version)
        raw = inflated(await request.body(), request.headers, self.max_body_bytes)
        body, tensors = _parse_request(raw, request.headers, self.shared_memory)
        timeout_ms = timeout_ms_of(
            timeout_ms_of_parameters(body.parameters), request.headers.get(TIMEOUT_HEADER)
        )
        call = InferCall(
            tensors,
            _requested(body),
            timeout_ms,
            model_parameters(body.parameters),
            _classifications(body),
        )
        outputs = await infer(queue, self.deadlines, call)
        answer = _answer(queue, body, outputs, self.shared_memory)
        encoding = chosen_encoding(request.headers.get("accept-encoding"))
        if encoding is not None:
            answer.body = compressed(bytes(answer.body), encoding)
            answer.headers["content-encoding"] = encoding
            answer.headers["content-length"] = str(len(answer.body))
            answer.headers["vary"] = "Accept-Encoding"
        return answer

    def _queue(self, request: Request) -> ModelQueue:
        return self.dispatcher.queue_for(
            request.path_params["name"], request.path_params.get("version")
        )


def _parse_request(
    raw: bytes, headers: Mapping[str, str], shared_memory: SharedMemory
) -> tuple[InferRequest, dict[str, np.ndarray]]:
    """The request and its input tensors by name, each with the batch axis first: from
    JSON, from the binary data after it, or from a shared memory region."""
    binary = b""
    if (header_size := headers.get(BINARY_HEADER)) is not None:
        if not header_size.isdigit() or int(header_size) > len(raw):
            raise PredictionError(400, f"bad Inference-Header-Content-Length {header_size!r}")
        raw, binary = raw[: int(header_size)], raw[int(header_size) :]
    body = decode_body(raw, InferRequest)
    if not body.inputs:
        raise PredictionError(400, "request body needs 'inputs': a non-empty list of tensors")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in body.inputs:
        name, shape, datatype = tensor.name, tensor.shape, tensor.datatype
        if name in tensors:
            raise PredictionError(400, f"input {name!r} is given twice")
        size = tensor.parameters.get("binary_data_size")
        if (placed := placement_of(name, tensor.parameters)) is not None:
            tensors[name] = shared_memory.read(name, datatype, shape, placed)
            continue
        try:
            if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
                if offset + size > len(binary):
                    raise ValueError("its binary data runs past the end of the request")
                chunk = binary[offset : offset + size]
                offset += size
                tensors[name] = tensor_from_binary(datatype, shape, chunk)
            elif tensor.data is not UNSET:
                tensors[name] = tensor_from_json(datatype, shape, tensor.data)
            else:
                raise ValueError("it has no 'data'")
        except ValueError as exc:
            raise PredictionError(400, f"input {name!r}: {exc}") from None
    return body, tensors


def _requested(body: InferRequest) -> list[str] | None:
    if isinstance(body.outputs, UnsetType):
        return None
    return [output.name for output in body.outputs]


def _classifications(body: InferRequest) -> dict[str, int]:
    if isinstance(body.outputs, UnsetType):
        return {}
    return {
        o.name: class_count_of(o.name, o.parameters["classification"])
        for o in body.outputs
        if "classification" in o.parameters
    }


def _goes_binary(body: InferRequest) -> Callable[[str], bool]:
    """Whether an output (by name) goes as binary data: each output's own ``binary_data``
    when it has one, else the request's ``binary_data_output``."""
    default = body.parameters.get("binary_data_output") is True
    asked: dict[str, bool] = {}
    if not isinstance(body.outputs, UnsetType):
        for output in body.outputs:
            if isinstance(flag := output.parameters.get("binary_data"), bool):
                asked[output.name] = flag
    return lambda name: asked.get(name, default)


def _answer(
    queue: ModelQueue, body: InferRequest, outputs: list[OutputTensor], shared: SharedMemory
) -> Response:
    goes_binary = _goes_binary(body)
    placements = _placements(body)
    chunks: list[bytes] = []
    tensors: list[dict[str, Any]] = []
    for output in outputs:
        tensor: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.array.shape),
        }
        if (placed := placements.get(output.name)) is not None:
            size = shared.write(output.name, output.datatype, output.array, placed)
            tensor["parameters"] = {REGION: placed.region, BYTE_SIZE: size}
            if placed.offset:
                tensor["parameters"][OFFSET] = placed.offset
        elif goes_binary(output.name):
            chunk = tensor_to_binary(output.datatype, output.array)
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = _json_data(queue, output)
        tensors.append(tensor)
    answer: dict[str, Any] = {
        "model_name": queue.spec.name,
        "model_version": queue.spec.version,
        "outputs": tensors,
    }
    if body.id is not UNSET:
        answer["id"] = body.id
    if not chunks:
        return answer_response(answer, f"model {queue.spec.label()!r}", **queue.labels())
    header = msgspec.json.encode(answer)
    return Response(
        b"".join([header, *chunks]),
        200,
        {BINARY_HEADER: str(len(header))},
        media_type="application/octet-stream",
    )


def _placements(body: InferRequest) -> dict[str, Placement]:
    """The outputs asked for in a shared memory region, by name."""
    if isinstance(body.outputs, UnsetType):
        return {}
    placed = ((o.name, placement_of(o.name, o.parameters)) for o in body.outputs)
    return {name: placement for name, placement in placed if placement is not None}


def _json_data(queue: ModelQueue, output: OutputTensor) -> list[Any]:
    array = output.array
    if array.dtype in FLOAT_DTYPES and not (finite := np.isfinite(array)).all():
        index = tuple(int(i) for i in np.argwhere(~finite)[0])
        number = non_finite_name(float(array[index]))
        raise PredictionError(
            500,
            f"output {output.name!r} of model {queue.spec.label()!r} holds {number} at "
            f"{list(index)}, which JSON cannot carry: the answer is refused rather than sent "
            "with null there (ask for it as binary data)",
            **queue.labels(),
        )
    data: list[Any] = array.ravel().tolist()
    if array.dtype.kind in "SO":
        try:
            data = [e.decode() if isinstance(e, bytes) else e for e in data]
        except UnicodeDecodeError:
            raise PredictionError(
                500,
                f"output {output.name!r} of model {queue.spec.label()!r} holds bytes that are "
                "not UTF-8 text, which JSON cannot carry (ask for it as binary data)",
                **queue.labels(),
            ) from None
    return data
