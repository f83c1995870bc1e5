"""Serve an ASGI app with Hypercorn on a socket ketch binds itself, within the bounds of
:mod:`ketch.http.limits`, and stop it gracefully (:mod:`ketch.http.draining`).

The gateway and the benchmark's bare baseline both go through this module, so "the same
Hypercorn settings" holds by construction. Binding the socket here (instead of letting
Hypercorn parse ``host:port``) lets callers ask for port 0 and learn the real port before the
server starts, which is how tests get ephemeral ports without races.

ketch runs the listening socket itself and hands each connection to Hypercorn's HTTP handling
(``TCPServer``, what ``hypercorn.asyncio.serve`` runs for each one). The reason is the order
of a graceful stop: ``serve`` offers only one step, which closes the listening socket *and*
every idle keep-alive connection at once, and cancels what is still running when its timeout
ends, so a request sent on a kept-alive connection just then is lost and one still running
gets no answer at all. Here, a stop first closes the listening socket only: connections
already open keep being answered (503, ``Retry-After``, while the requests in flight finish
within the grace period); only then is Hypercorn told to close them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

from hypercorn.asyncio.lifespan import Lifespan
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.typing import Framework, LifespanState
from hypercorn.utils import wrap_app

from ketch.http.draining import Draining, refuse_while_stopping
from ketch.http.limits import MAX_HEADER_BYTES, BoundedRequests, HttpLimits

T = TypeVar("T")

log = logging.getLogger("ketch.http")

#: Hypercorn's listen backlog; large enough that a burst of connections is not refused.
LISTEN_BACKLOG = 2048
#: After the drain, how long connections get to send their last answers before they are cut.
CLOSE_TIMEOUT_S = 5.0


def bind_tcp(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """Bind a listening TCP socket; ``port=0`` picks a free ephemeral port. With
    ``reuse_port``, other processes may listen on the same port (``SO_REUSEPORT``), and the
    kernel spreads the connections over them (``ketch serve --gateways N``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(LISTEN_BACKLOG)
    return sock


def hypercorn_config(limits: HttpLimits) -> Config:
    """The Hypercorn settings ketch serves with: keep-alive, bounded headers, no access log."""
    config = Config()
    config.backlog = LISTEN_BACKLOG
    # Hypercorn's one timer for a connection between requests runs from its start (or the
    # previous answer) until a request's headers are complete: it is both the keep-alive
    # timeout and the deadline of slow headers, so the read timeout sets it (as Go's
    # http.Server uses its ReadTimeout when no IdleTimeout is given).
    config.keep_alive_timeout = limits.read_timeout_s
    config.h11_max_incomplete_size = MAX_HEADER_BYTES
    config.h2_max_header_list_size = MAX_HEADER_BYTES
    # Not Hypercorn's read_timeout: it bounds every wait for the client's next bytes, and a
    # client waiting for a slow prediction sends none, so it would cut long requests off. The
    # body's deadline is ketch.http.limits'.
    config.read_timeout = None
    config.accesslog = None
    config.errorlog = log
    return config


async def serve_asgi(
    app: Any,
    sock: socket.socket,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    limits: HttpLimits | None = None,
    hurry_trigger: Callable[[], Awaitable[Any]] | None = None,
) -> None:
    """Serve ``app`` on the already-bound ``sock`` until ``shutdown_trigger`` returns, then
    stop gracefully: no new connections, the requests in flight given ``limits``' grace period
    (cut short when ``hurry_trigger`` returns), every other request answered 503.

    The socket is closed when this returns.
    """
    limits = limits or HttpLimits()
    config = hypercorn_config(limits)
    gate = Draining(BoundedRequests(app, limits), BoundedRequests(refuse_while_stopping, limits))
    served = wrap_app(cast(Framework, gate), config.wsgi_max_body_size, "asgi")
    loop = asyncio.get_running_loop()
    state: LifespanState = {}
    lifespan = Lifespan(served, config, loop, state)
    lifespan_task = loop.create_task(lifespan.handle_lifespan())
    await lifespan.wait_for_startup()
    if lifespan_task.done() and (failure := lifespan_task.exception()) is not None:
        raise failure
    context = WorkerContext(None)
    connections: set[asyncio.Task[Any]] = set()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            connections.add(task)
            task.add_done_callback(connections.discard)
        await TCPServer(served, loop, config, context, state, reader, writer)

    listening = await asyncio.start_server(connected, sock=sock, backlog=LISTEN_BACKLOG)
    try:
        await shutdown_trigger()
        listening.close()
        grace = limits.shutdown_grace_s
        log.info(
            "stopping: no new connections; %d requests in flight have %g s to finish "
            "(--shutdown-grace), new ones are answered 503",
            gate.in_flight,
            grace,
        )
        drained = await gate.drain(grace, hurry_trigger)
        if drained.cut_off:
            log.warning(
                "stopping: %d requests still in flight after the %g s grace were answered 503 "
                "(%d finished in time)",
                drained.cut_off,
                grace,
                drained.finished,
            )
    finally:
        listening.close()
        await _close_connections(context, connections)
        await lifespan.wait_for_shutdown()
        lifespan_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lifespan_task


async def _close_connections(context: WorkerContext, connections: set[asyncio.Task[Any]]) -> None:
    """Tell Hypercorn to close every connection (idle ones at once, the others after their
    answer), and cut those still open after :data:`CLOSE_TIMEOUT_S`."""
    await context.terminated.set()
    if connections:
        _, still_open = await asyncio.wait(set(connections), timeout=CLOSE_TIMEOUT_S)
        for task in still_open:
            task.cancel()
        if still_open:
            await asyncio.wait(still_open, timeout=CLOSE_TIMEOUT_S)


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed (Linux, macOS), else on asyncio's loop."""
    if sys.platform == "win32":
        return asyncio.run(main)
    import uvloop

    return uvloop.run(main)
