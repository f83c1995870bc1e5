"""Serve an ASGI app with Hypercorn on a socket ketch binds itself.

The gateway and the benchmark's bare baseline both go through this module, so "the same
Hypercorn settings" holds by construction. Binding the socket here (instead of letting
Hypercorn parse ``host:port``) lets callers ask for port 0 and learn the real port before the
server starts, which is how tests get ephemeral ports without races.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

from hypercorn.asyncio import serve
from hypercorn.config import Config
from hypercorn.typing import Framework

T = TypeVar("T")

#: Hypercorn's listen backlog; large enough that a burst of connections is not refused.
LISTEN_BACKLOG = 2048


def bind_tcp(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket; ``port=0`` picks a free ephemeral port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


def hypercorn_config(sock: socket.socket) -> Config:
    """The Hypercorn settings ketch serves with: one process, keep-alive, no access log."""
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.backlog = LISTEN_BACKLOG
    config.keep_alive_timeout = 75.0
    config.graceful_timeout = 5.0
    config.accesslog = None
    config.errorlog = logging.getLogger("ketch.http")
    return config


async def serve_asgi(
    app: Any, sock: socket.socket, shutdown_trigger: Callable[[], Awaitable[Any]]
) -> None:
    """Serve ``app`` on the already-bound ``sock`` until ``shutdown_trigger`` returns.

    Hypercorn takes ownership of the socket and closes it when it stops.
    """
    config = hypercorn_config(sock)
    sock.detach()
    await serve(cast(Framework, app), config, shutdown_trigger=shutdown_trigger, mode="asgi")


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed (Linux, macOS), else on asyncio's loop."""
    if sys.platform == "win32":
        return asyncio.run(main)
    import uvloop

    return uvloop.run(main)
