"""The bounds on what one HTTP request may make the gateway hold, and the ASGI layer in front
of every route that enforces them on its headers and body.

* **Body size** (``--max-body-mb``, 64 MiB): a ``Content-Length`` over the limit is refused
  with a JSON 413 before a byte of the body is read; a chunked body is read until its running
  total passes the limit, then refused the same way. What is left of it is never kept: the
  answer closes the connection, after reading and dropping at most :data:`LINGER_BYTES` more
  for at most :data:`LINGER_S` so that the client can read the answer. (Over HTTP/2 the rest
  is read and dropped before the 413, within the read timeout, and the connection goes on:
  Hypercorn drops the whole connection when data comes for a stream already answered.)
* **Body time** (``--read-timeout``, 30 s): the whole body must arrive within this time of the
  request's headers. A body that trickles in (a byte every few seconds) is answered with a JSON
  408 when its time is up, if the client is still there to read it.
* **Headers**: the request's target and headers may hold at most :data:`MAX_HEADER_BYTES`,
  else a JSON 431. Hypercorn buffers at most that much of headers that have not ended (431
  too), but takes longer ones that arrive whole in one read of 64 KiB, hence the check here.
  They must arrive within the read timeout of the connection's start or of the previous answer
  on it (see :func:`ketch.http.server.hypercorn_config`).

Reading the whole body here, before any route runs, changes nothing for the routes: each of
them read its body before answering anyway (:mod:`ketch.http.endpoints`). They get it from
memory, in one message.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ketch.http.asgi import declared_length, head_size, may_have_body, send_json

MIB = 2**20
DEFAULT_MAX_BODY_BYTES = 64 * MIB
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_SHUTDOWN_GRACE_S = 30.0
#: The request line and headers together (Hypercorn's ``h11_max_incomplete_size``).
MAX_HEADER_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """How much and how long one request may take of the gateway, and how long a stopping
    server gives the requests it has.

    :param max_body_bytes: the largest request body; larger ones get a 413.
    :param read_timeout_s: the longest a request's headers (from the connection's start or the
        previous answer on it) and then its body may take to arrive; a late body gets a 408.
    :param shutdown_grace_s: on SIGINT or SIGTERM, how long requests in flight have to finish
        before they are answered 503 (see :mod:`ketch.http.draining`).
    :param streamed: paths whose route reads the body itself as it arrives, within limits of
        its own (an upload to ``/admin/deployments``): their bodies are not read here.
    """

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    streamed: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"the body size limit must be > 0 bytes, got {self.max_body_bytes}")
        if not self.read_timeout_s > 0:
            raise ValueError(f"the read timeout must be > 0 s, got {self.read_timeout_s}")
        if not self.shutdown_grace_s >= 0:
            raise ValueError(f"the shutdown grace must be >= 0 s, got {self.shutdown_grace_s}")


class BoundedRequests:
    """Checks each request's headers and reads its body within the :class:`HttpLimits`
    before ``app`` sees the request (see the module docstring); ``app`` then gets the body in
    one message."""

    def __init__(self, app: ASGIApp, limits: HttpLimits) -> None:
        self._app = app
        self._max_bytes = limits.max_body_bytes
        self._timeout_s = limits.read_timeout_s
        self._streamed = limits.streamed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        if (head := head_size(scope)) > MAX_HEADER_BYTES:
            error = (
                f"the request's target and headers are {head} bytes, more than this server "
                f"takes: at most {MAX_HEADER_BYTES} bytes"
            )
            await send_json(
                scope, send, 431, {"error": error, "max_header_bytes": MAX_HEADER_BYTES}
            )
            return
        if not may_have_body(scope) or scope["path"] in self._streamed:
            await self._app(scope, receive, send)
            return
        declared = declared_length(scope)
        too_large = None if declared is None or declared <= self._max_bytes else declared
        # HTTP/1: refuse at once and close the connection, never reading the rest. HTTP/2:
        # read the rest and drop it, then refuse (see the module docstring).
        answer_at_once = scope.get("http_version", "1.1") in ("1.0", "1.1")
        chunks: list[bytes] = []
        received = 0
        # The deadline as asyncio.timeout() would set it (a timer that cancels this task),
        # at a quarter of its cost: it is paid by every request with a body.
        task = asyncio.current_task()
        timed_out = False

        def time_out() -> None:
            nonlocal timed_out
            timed_out = True
            if task is not None:
                task.cancel()

        timer = asyncio.get_running_loop().call_later(self._timeout_s, time_out)
        try:
            while not (too_large is not None and answer_at_once):
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # no one to answer
                chunk: bytes = message.get("body", b"")
                received += len(chunk)
                if received > self._max_bytes and too_large is None:
                    too_large, chunks = received, []
                if too_large is None:
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        except asyncio.CancelledError:
            if not timed_out or task is None:
                raise
            task.uncancel()
            if too_large is None:
                error = (
                    f"the request body did not arrive within {self._timeout_s:g} s (ketch serve "
                    f"--read-timeout); {received} bytes of it came"
                )
                await send_json(scope, send, 408, {"error": error, "timeout_s": self._timeout_s})
                return
        finally:
            timer.cancel()
        if too_large is not None:
            size = f"is {declared} bytes, more" if too_large == declared else "is larger"
            await send_json(scope, send, 413, self._too_large(size))
            if answer_at_once:
                await linger(receive)
            return
        await self._app(scope, _replaying(b"".join(chunks), receive), send)

    def _too_large(self, size: str) -> dict[str, object]:
        limit = self._max_bytes
        error = (
            f"the request body {size} than this server takes: at most {limit} bytes "
            f"({limit / MIB:g} MiB, ketch serve --max-body-mb)"
        )
        return {"error": error, "max_body_bytes": limit}


#: After a 413, how long and how much more of the refused body is read and dropped before the
#: connection closes (a lingering close, as nginx's): closing on unread bytes makes the kernel
#: reset the connection, and a client still sending then may lose the answer with it.
LINGER_S = 2.0
LINGER_BYTES = 8 * MIB


async def linger(receive: Receive) -> None:
    """Read and drop what is left of a refused body, within :data:`LINGER_BYTES` and
    :data:`LINGER_S`, so the client can read the answer before the connection closes."""
    dropped = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER_S):
            while dropped < LINGER_BYTES:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
                dropped += len(message.get("body", b""))


def _replaying(body: bytes, receive: Receive) -> Receive:
    """``receive`` for an app whose request body was read already: the body first, in one
    message, then whatever the server says next (a disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
