"""``inference.GRPCInferenceService``: the Open Inference Protocol's gRPC methods over the
gateway's dispatcher, built from the stubs ``tritonclient[grpc]`` ships (see
``docs/protocols.md`` for why those and not stubs of our own).

Every method is served the way an HTTP route is: the token first (gRPC metadata
``authorization: Bearer <token>``, the health methods open), then the handler; a
:class:`~ketch.serving.jobs.PredictionError` becomes the gRPC status that says the same as its
HTTP one (400 ``INVALID_ARGUMENT``, 404 ``NOT_FOUND``, 429 ``RESOURCE_EXHAUSTED``, 503
``UNAVAILABLE``, 504 ``DEADLINE_EXCEEDED``, ...) with the same message, and ``ModelInfer`` is
counted and timed in the same metrics as ``POST .../infer``, under the HTTP status it would have
had. A call's deadline is the earliest of its gRPC deadline and its ``timeout`` parameter, under
the same deadline rule as every route (:class:`~ketch.serving.admission.Deadlines`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
import msgspec
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from ketch.grpc.tensors import infer_response, input_tensors, output_placements, parameters_of
from ketch.http.auth import Needs, TokenGuard, bearer_token
from ketch.http.repository import IndexAnswer, Repository
from ketch.inference.calls import (
    InferCall,
    class_count_of,
    infer,
    model_parameters,
    timeout_ms_of_parameters,
)
from ketch.inference.extensions import model_config, statistics
from ketch.inference.metadata import ModelReadiness, model_metadata, server_metadata
from ketch.inference.shared_memory import SharedMemory, cuda_refused
from ketch.observability.metrics import Metrics
from ketch.serving.admission import Deadlines
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import PredictionError
from ketch.serving.queue import ModelQueue

T = TypeVar("T")
#: A method's context; the messages are protobuf classes the stubs leave untyped.
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

#: The gRPC status for each HTTP status ketch's errors carry.
_STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
#: How many requests of one ``ModelStreamInfer`` stream may be in flight at once.
STREAM_IN_FLIGHT = 256


def status_code(http_status: int) -> grpc.StatusCode:
    return _STATUS_CODES.get(http_status, grpc.StatusCode.UNKNOWN)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The servicer (see the module's docstring); methods not defined here answer
    ``UNIMPLEMENTED``, as the stubs' base class does."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        deadlines: Deadlines,
        guard: TokenGuard,
        metrics: Metrics,
        repository: Repository,
        shared_memory: SharedMemory,
    ) -> None:
        self._repository = repository
        self._shared_memory = shared_memory
        self._dispatcher = dispatcher
        self._deadlines = deadlines
        self._guard = guard
        self._metrics = metrics

    # -- health and metadata ----------------------------------------------------------------

    # The health methods are open, as the HTTP probes are: orchestrators ask without a token.

    async def ServerLive(self, request: Any, context: Context) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=not self._dispatcher.not_ready())

    async def ServerMetadata(self, request: Any, context: Context) -> Any:
        async def answer() -> Any:
            meta = server_metadata()
            return pb.ServerMetadataResponse(
                name=meta.name, version=meta.version, extensions=meta.extensions
            )

        return await self._served(context, "predict", answer)

    async def ModelReady(self, request: Any, context: Context) -> Any:
        async def answer() -> Any:
            if self._repository.is_unloaded(request.name):
                return pb.ModelReadyResponse(ready=False)  # known, out of service: not ready
            ready = ModelReadiness.of(self._queue(request.name, request.version))
            return pb.ModelReadyResponse(ready=ready.ready)

        return await self._served(context, "predict", answer)

    async def ModelMetadata(self, request: Any, context: Context) -> Any:
        async def answer() -> Any:
            meta = model_metadata(self._dispatcher, self._queue(request.name, request.version))
            return pb.ModelMetadataResponse(
                name=meta.name,
                versions=meta.versions,
                platform=meta.platform,
                inputs=[_tensor_metadata(t) for t in meta.inputs],
                outputs=[_tensor_metadata(t) for t in meta.outputs],
            )

        return await self._served(context, "predict", answer)

    # -- Triton's extensions ----------------------------------------------------------------

    async def ModelConfig(self, request: Any, context: Context) -> Any:
        async def answer() -> Any:
            config = model_config(self._queue(request.name, request.version))
            return pb.ModelConfigResponse(config=_parsed(config, model_config_pb2.ModelConfig()))

        return await self._served(context, "predict", answer)

    async def ModelStatistics(self, request: Any, context: Context) -> Any:
        async def answer() -> Any:
            found = statistics(self._dispatcher, request.name or None, request.version or None)
            return _parsed(found, pb.ModelStatisticsResponse())

        return await self._served(context, "predict", answer)

    async def RepositoryIndex(self, request: Any, context: Context) -> Any:
        async def answer() -> Any:
            entries = self._repository.index(request.ready)
            return _parsed(IndexAnswer(models=entries), pb.RepositoryIndexResponse())

        return await self._served(context, "predict", answer)

    async def RepositoryModelLoad(self, request: Any, context: Context) -> Any:
        async def answer() -> Any:
            parameters = parameters_of(request.parameters)
            await self._repository.load(request.model_name, parameters)
            return pb.RepositoryModelLoadResponse()

        return await self._served(context, "predict", answer)

    async def RepositoryModelUnload(self, request: Any, context: Context) -> Any:
        async def answer() -> Any:
            await self._repository.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._served(context, "predict", answer)

    # -- shared memory ----------------------------------------------------------------------

    async def SystemSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        async def answer() -> Any:
            regions = self._shared_memory.status(request.name or None)
            response = pb.SystemSharedMemoryStatusResponse()
            for region in regions:
                response.regions[region.name].CopyFrom(
                    pb.SystemSharedMemoryStatusResponse.RegionStatus(
                        name=region.name,
                        key=region.key,
                        offset=region.offset,
                        byte_size=region.byte_size,
                    )
                )
            return response

        return await self._served(context, "predict", answer)

    async def SystemSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        async def answer() -> Any:
            self._shared_memory.register(
                request.name, request.key, request.offset, request.byte_size
            )
            return pb.SystemSharedMemoryRegisterResponse()

        return await self._served(context, "predict", answer)

    async def SystemSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        async def answer() -> Any:
            self._shared_memory.unregister(request.name or None)
            return pb.SystemSharedMemoryUnregisterResponse()

        return await self._served(context, "predict", answer)

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        async def answer() -> Any:
            return pb.CudaSharedMemoryStatusResponse()  # none is ever registered

        return await self._served(context, "predict", answer)

    async def CudaSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        async def answer() -> Any:
            raise cuda_refused()

        return await self._served(context, "predict", answer)

    async def CudaSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        async def answer() -> Any:
            return pb.CudaSharedMemoryUnregisterResponse()  # nothing to let go

        return await self._served(context, "predict", answer)

    # -- inference --------------------------------------------------------------------------

    async def ModelInfer(self, request: Any, context: Context) -> Any:
        if (why := self._refusal(context, "predict")) is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        try:
            return await self._infer(request, context.time_remaining())
        except PredictionError as exc:
            await _abort(context, exc)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: Context
    ) -> AsyncIterator[Any]:
        """Each request of the stream answered as it completes (with its ``id``); a request
        that fails is answered with its ``error_message`` and the stream goes on."""
        if (why := self._refusal(context, "predict")) is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        answers: asyncio.Queue[Any] = asyncio.Queue()
        room = asyncio.Semaphore(STREAM_IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()

        async def answer(request: Any) -> None:
            try:
                response = await self._infer(request, context.time_remaining())
                await answers.put(pb.ModelStreamInferResponse(infer_response=response))
            except PredictionError as exc:
                await answers.put(pb.ModelStreamInferResponse(error_message=str(exc)))
            finally:
                room.release()

        async def read() -> None:
            async for request in requests:
                await room.acquire()
                task = asyncio.create_task(answer(request))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running)
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
            await reader  # its exception, if reading the stream failed
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _infer(self, request: Any, remaining_s: float | None) -> Any:
        """One ``ModelInferRequest`` answered, counted in the metrics as ``.../infer`` is."""
        started = time.perf_counter()
        model, version, status = request.model_name, "", 500
        try:
            queue = self._queue(request.model_name, request.model_version)
            model, version = queue.spec.name, queue.spec.version
            tensors = input_tensors(request, self._shared_memory)
            parameters = parameters_of(request.parameters)
            timeout_ms = timeout_ms_of_parameters(parameters)
            if remaining_s is not None:
                remaining_ms = max(remaining_s * 1000, 0.001)
                timeout_ms = remaining_ms if timeout_ms is None else min(timeout_ms, remaining_ms)
            requested = [o.name for o in request.outputs] or None
            classifications = {}
            for output in request.outputs:
                if "classification" in output.parameters:
                    count = parameters_of(output.parameters)["classification"]
                    classifications[output.name] = class_count_of(output.name, count)
            call = InferCall(
                tensors, requested, timeout_ms, model_parameters(parameters), classifications
            )
            outputs = await infer(queue, self._deadlines, call)
            status = 200
            placements = output_placements(request)
            return infer_response(
                model, version, request.id, outputs, placements, self._shared_memory
            )
        except PredictionError as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 503
            raise
        finally:
            known = self._dispatcher.knows_model(model)
            self._metrics.request_done(
                model if known else "", version, status, time.perf_counter() - started
            )

    # -- what every method shares -----------------------------------------------------------

    def _queue(self, name: str, version: str) -> ModelQueue:
        return self._dispatcher.queue_for(name, version or None)

    def _refusal(self, context: Context, needs: Needs) -> str | None:
        return self._guard.refusal_for(needs, lambda: _token_of(context))

    async def _served(
        self, context: Context, needs: Needs, answer: Callable[[], Awaitable[T]]
    ) -> T:
        if (why := self._refusal(context, needs)) is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        try:
            return await answer()
        except PredictionError as exc:
            await _abort(context, exc)
            raise  # abort raises; this line is never reached


def _parsed(answer: msgspec.Struct, message: Any) -> Any:
    """An answer in Triton's JSON form as its protobuf ``message``."""
    return json_format.ParseDict(msgspec.to_builtins(answer), message)


def _tensor_metadata(tensor: Any) -> Any:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=tensor.name, datatype=tensor.datatype, shape=tensor.shape
    )


def _token_of(context: Context) -> bytes | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            raw = value if isinstance(value, bytes) else value.encode()
            return bearer_token(raw)
    return None


async def _abort(context: Context, exc: PredictionError) -> None:
    """End the call with the gRPC status of ``exc``'s HTTP one; ``Retry-After`` goes along as
    trailing metadata ``retry-after``."""
    if (retry_after := exc.headers.get("Retry-After")) is not None:
        context.set_trailing_metadata((("retry-after", retry_after),))
    await context.abort(status_code(exc.status), str(exc))
