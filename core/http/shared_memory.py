"""Triton's shared memory extensions over REST: system shared memory regions registered,
listed and unregistered (:mod:`ketch.inference.shared_memory`), and CUDA shared memory, whose
registration is refused (its status lists nothing, its unregister has nothing to do, so that
clients which clear both at start go on)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ketch.http.endpoints import Endpoints, decode_body, json_response
from ketch.inference.shared_memory import RegisterRequest, SharedMemory, cuda_refused

SYSTEM = "/v2/systemsharedmemory"
CUDA = "/v2/cudasharedmemory"


class SharedMemoryRoutes:
    """The routes over one gateway's :class:`SharedMemory`."""

    def __init__(self, regions: SharedMemory) -> None:
        self._regions = regions

    def routes(self, endpoints: Endpoints) -> list[Route]:
        route = endpoints.route
        return [
            route(f"{SYSTEM}/status", self.status, ["GET"]),
            route(f"{SYSTEM}/region/{{region}}/status", self.status, ["GET"]),
            route(f"{SYSTEM}/region/{{region}}/register", self.register, ["POST"]),
            route(f"{SYSTEM}/unregister", self.unregister, ["POST"]),
            route(f"{SYSTEM}/region/{{region}}/unregister", self.unregister, ["POST"]),
            route(f"{CUDA}/status", self.cuda_status, ["GET"]),
            route(f"{CUDA}/region/{{region}}/status", self.cuda_status, ["GET"]),
            route(f"{CUDA}/region/{{region}}/register", self.cuda_register, ["POST"]),
            route(f"{CUDA}/unregister", self.cuda_unregister, ["POST"]),
            route(f"{CUDA}/region/{{region}}/unregister", self.cuda_unregister, ["POST"]),
        ]

    async def status(self, request: Request) -> Response:
        return json_response(self._regions.status(request.path_params.get("region")))

    async def register(self, request: Request) -> Response:
        body = decode_body(await request.body(), RegisterRequest)
        self._regions.register(request.path_params["region"], body.key, body.offset, body.byte_size)
        return json_response({})

    async def unregister(self, request: Request) -> Response:
        self._regions.unregister(request.path_params.get("region"))
        return json_response({})

    async def cuda_status(self, request: Request) -> Response:
        return json_response([])

    async def cuda_register(self, request: Request) -> Response:
        raise cuda_refused()

    async def cuda_unregister(self, request: Request) -> Response:
        return json_response({})
