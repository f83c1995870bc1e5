"""grpcio's asyncio server in the gateway's event loop, serving
:class:`~ketch.grpc.service.InferenceService`.

It binds before the served file is imported (a port in use fails ``ketch serve`` at once, like
the HTTP port), takes messages up to the HTTP body limit (``--max-body-mb``), and stops with the
HTTP gateway: new calls are refused at once, calls in flight get the shutdown grace period.
"""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from ketch.grpc.service import InferenceService

#: Triton's gRPC port, which its clients default to.
DEFAULT_GRPC_PORT = 8001


class GrpcServer:
    """One ``grpc.aio`` server on ``host:port`` (0 picks a free port)."""

    def __init__(
        self, host: str, port: int, max_message_bytes: int, reuse_port: bool = False
    ) -> None:
        """:param reuse_port: share the port with the other gateways of ``--gateways N``;
        otherwise one gateway owns it, and a second one must fail, not share it."""
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", int(reuse_port)),
            ]
        )
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {address}: {exc}") from None
        if self.port == 0:
            raise OSError(f"cannot listen for gRPC on {address}")
        self._host = host

    @property
    def address(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self.port}"

    async def start(self, service: InferenceService) -> None:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, self._server)
        await self._server.start()

    async def stop(self, grace_s: float | None) -> None:
        """Refuse new calls; those in flight get ``grace_s`` seconds (None: until done)."""
        await self._server.stop(grace_s)
