"""The Open Inference Protocol (KServe V2) over REST, on top of ketch's model queues.

Routes (errors are ``{"error": "..."}`` with a 4xx/5xx status, as on ketch's own routes):

* ``GET /v2``: server metadata.
* ``GET /v2/models/{name}[/versions/{version}]``: the model's tensors, with the batch axis.
* ``GET /v2/models/{name}[/versions/{version}]/ready``: 200, or 503 when it cannot serve.
* ``POST /v2/models/{name}[/versions/{version}]/infer``: one request's tensors in, one
  response's tensors out.

A V2 tensor's first dimension is the batch: the request's inputs are cut into items along it,
and each item goes through the same path as one input of ``/models/{name}/predict`` (cache,
batching with other requests, deadlines). With one input tensor, an item is that tensor's row;
with several, an item is ``{input_name: row}``. The items' outputs are stacked back along the
first axis: one tensor per key when each output is a dict, else one tensor. A tensor the
model declares (or its runtime announces) in ``outputs`` is cast to that datatype, when every
value survives the cast (see :func:`~ketch.http.oip_types.cast_output`); else the answer is a 500.
So is an output holding NaN or infinity, which JSON cannot carry (``docs/http-api.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from msgspec import UNSET, UnsetType
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import ketch
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
from ketch.http.oip_types import (
    V2_TO_NUMPY,
    cast_output,
    tensor_from_binary,
    tensor_from_json,
    v2_datatype,
    v2_datatype_of,
)
from ketch.serving.admission import Deadlines, predict
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import PredictionError
from ketch.serving.queue import ModelQueue
from ketch.serving.status import ready_to_serve
from ketch.specs.signature import TensorSpec

#: Set by clients sending binary tensors after the JSON header (Triton's extension).
BINARY_HEADER = "inference-header-content-length"


class OpenInference:
    """The V2 handlers over one :class:`Dispatcher` (see the module's docstring)."""

    def __init__(self, dispatcher: Dispatcher, deadlines: Deadlines) -> None:
        self.dispatcher = dispatcher
        self.deadlines = deadlines

    def routes(self, endpoints: Endpoints) -> list[Route]:
        routes = [endpoints.route("/v2", self.server_metadata, ["GET"])]
        for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [
                endpoints.route(model, self.model_metadata, ["GET"]),
                endpoints.route(f"{model}/ready", self.model_ready, ["GET"]),
                endpoints.model_route(f"{model}/infer", self.infer, ["POST"]),
            ]
        return routes

    async def server_metadata(self, request: Request) -> Response:
        return json_response({"name": "ketch", "version": ketch.__version__, "extensions": []})

    async def model_metadata(self, request: Request) -> Response:
        queue = self._queue(request)
        spec = queue.spec
        return json_response(
            {
                "name": spec.name,
                "versions": self.dispatcher.versions(spec.name),
                "platform": f"ketch_{spec.runtime}",
                "inputs": [_metadata(t) for t in spec.inputs or spec.hinted_inputs],
                "outputs": [_metadata(t) for t in spec.outputs or spec.hinted_outputs],
            }
        )

    async def model_ready(self, request: Request) -> Response:
        queue = self._queue(request)
        # Pools scale from zero: a model without workers is ready when a request would start one.
        ready = ready_to_serve(queue)
        answer = {"name": queue.spec.name, "version": queue.spec.version, "ready": ready}
        return json_response(answer, 200 if ready else 503)

    async def infer(self, request: Request, reached: Reached) -> Response:
        queue = self._queue(request)
        # Known from the path: even a request failing below is counted under this version.
        reached.set(queue.spec.name, queue.spec.version)
        body, tensors = _parse_request(await request.body(), request.headers)
        items = _items(queue, tensors)
        timeout_ms = timeout_ms_of(_client_timeout(body), request.headers.get(TIMEOUT_HEADER))
        deadline = self.deadlines.deadline(timeout_ms, queue.spec.slo_ms)
        outputs = await predict(queue, items, deadline)
        answer = {
            "model_name": queue.spec.name,
            "model_version": queue.spec.version,
            "outputs": _output_tensors(queue, list(outputs), _requested(body)),
        }
        if body.id is not UNSET:
            answer["id"] = body.id
        return answer_response(answer, f"model {queue.spec.label()!r}", **queue.labels())

    def _queue(self, request: Request) -> ModelQueue:
        return self.dispatcher.queue_for(
            request.path_params["name"], request.path_params.get("version")
        )


def _metadata(tensor: TensorSpec) -> dict[str, Any]:
    # ketch's shapes are per item; V2's include the batch axis, of any size.
    datatype = v2_datatype(tensor.datatype) or tensor.datatype.upper()
    return {"name": tensor.name, "datatype": datatype, "shape": [-1, *tensor.shape]}


def _parse_request(
    raw: bytes, headers: Mapping[str, str]
) -> tuple[InferRequest, dict[str, np.ndarray]]:
    """The request and its input tensors by name, each with the batch axis first."""
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
        if not shape:
            raise PredictionError(
                400, f"input {name!r}: 'shape' must be a list of sizes >= 0, the batch first"
            )
        if name in tensors:
            raise PredictionError(400, f"input {name!r} is given twice")
        size = tensor.parameters.get("binary_data_size")
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
    batch_sizes = {array.shape[0] for array in tensors.values()}
    if len(batch_sizes) > 1:
        raise PredictionError(
            400, f"inputs must share their first (batch) dimension, got {sorted(batch_sizes)}"
        )
    if batch_sizes == {0}:
        raise PredictionError(400, "the batch dimension is 0: send at least one item")
    return body, tensors


def _client_timeout(body: InferRequest) -> float | None:
    """The request's ``parameters.timeout`` (microseconds, as tritonclient sends it) in ms;
    the X-Ketch-Timeout-Ms header is only read when it is absent."""
    timeout_us = body.parameters.get("timeout")
    if isinstance(timeout_us, int | float) and not isinstance(timeout_us, bool):
        if not 0 < timeout_us < 1e12:
            raise PredictionError(
                400, f"'parameters.timeout' must be microseconds > 0, got {timeout_us!r}"
            )
        return timeout_us / 1000
    return None


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    )


def _items(queue: ModelQueue, tensors: dict[str, np.ndarray]) -> list[Any]:
    """The request's tensors cut into the items the model's queue takes (see the module's
    docstring); checked against the model's declared tensors first, for errors naming them."""
    declared = {t.name: t for t in queue.spec.inputs}
    if declared:
        _check_names(queue, set(declared), set(tensors))
        for name, array in tensors.items():
            want = v2_datatype(declared[name].datatype)
            got = v2_datatype_of(array)
            # Only types JSON can carry: a runtime's BF16 input is fed FP32, as on /predict.
            if want in V2_TO_NUMPY and want != got:
                raise PredictionError(
                    400,
                    f"input {name!r} of model {queue.spec.label()!r} is {want}, got {got}",
                    **queue.labels(),
                )
    # Numpy models get their rows as arrays, stacked again (keeping the dtype) by the queue;
    # everything else gets Python values, as parsed JSON would be. Cache keys are built from
    # JSON, which float16 arrays cannot be, so cached models get Python values too.
    as_arrays = queue.spec.batch_input == "numpy" and queue.cache is None
    if len(tensors) == 1 and len(declared) <= 1:
        (array,) = tensors.values()
        return list(array) if as_arrays else array.tolist()
    columns = {name: array.tolist() for name, array in tensors.items()}
    batch = len(next(iter(columns.values())))
    return [{name: column[i] for name, column in columns.items()} for i in range(batch)]


def _check_names(queue: ModelQueue, declared: set[str], given: set[str]) -> None:
    problems = []
    if missing := sorted(declared - given):
        problems.append(f"missing {missing}")
    if unknown := sorted(given - declared):
        problems.append(f"unknown {unknown}")
    if problems:
        raise PredictionError(
            400,
            f"model {queue.spec.label()!r} takes inputs {sorted(declared)}: " + ", ".join(problems),
            **queue.labels(),
        )


def _requested(body: InferRequest) -> list[str] | None:
    if isinstance(body.outputs, UnsetType):
        return None
    return [output.name for output in body.outputs]


def _output_tensors(
    queue: ModelQueue, outputs: list[Any], requested: list[str] | None
) -> list[dict[str, Any]]:
    """The items' outputs stacked into V2 tensors, only the ``requested`` ones when given."""
    if outputs and all(isinstance(o, Mapping) for o in outputs):
        names = list(outputs[0])
        columns = {name: [o.get(name) for o in outputs] for name in names}
    else:
        announced = queue.spec.outputs or queue.spec.hinted_outputs
        columns = {announced[0].name if announced else "output_0": outputs}
    if requested is not None:
        if unknown := [name for name in requested if name not in columns]:
            raise PredictionError(
                400,
                f"model {queue.spec.label()!r} has no outputs {unknown}; it has {list(columns)}",
                **queue.labels(),
            )
        columns = {name: columns[name] for name in dict.fromkeys(requested)}
    return [_output_tensor(queue, name, column) for name, column in columns.items()]


def _output_tensor(queue: ModelQueue, name: str, column: list[Any]) -> dict[str, Any]:
    try:
        array = np.asarray(column)
    except ValueError:
        array = np.asarray(None, dtype=object)  # ragged: reported below like other objects
    datatype = v2_datatype_of(array)
    if datatype is None:
        raise PredictionError(
            500,
            f"output {name!r} of model {queue.spec.label()!r} is not a tensor V2 can carry "
            f"(numbers, booleans or strings of one shape per item), got {array.dtype.name}",
            **queue.labels(),
        )
    declared = next((t for t in queue.spec.outputs if t.name == name), None)
    want = v2_datatype(declared.datatype) if declared is not None else None
    # Only types JSON can carry: a runtime's BF16 output goes out as the array it is.
    if want is not None and want in V2_TO_NUMPY and want != datatype:
        try:
            array = cast_output(array, want)
        except ValueError as exc:
            raise PredictionError(
                500,
                f"output {name!r} of model {queue.spec.label()!r} is declared {want}, but the "
                f"model returned {datatype}: {exc}",
                **queue.labels(),
            ) from None
        datatype = want
    if array.dtype.kind == "f" and not (finite := np.isfinite(array)).all():
        index = tuple(int(i) for i in np.argwhere(~finite)[0])
        number = non_finite_name(float(array[index]))
        raise PredictionError(
            500,
            f"output {name!r} of model {queue.spec.label()!r} holds {number} at {list(index)}, "
            "which JSON cannot carry: the answer is refused rather than sent with null there",
            **queue.labels(),
        )
    data = array.ravel().tolist()
    if array.dtype.kind == "S":
        data = [b.decode(errors="replace") for b in data]
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}
