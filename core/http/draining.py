"""A stopping server's last answers: the requests in flight get the grace period to finish, and
every other one a JSON 503 with ``Retry-After``.

:class:`Draining` sits in front of the app and knows every request in flight. Once
:meth:`Draining.drain` is called (on SIGINT or SIGTERM, when the server has stopped accepting
connections), a request that arrives on a connection already open is answered 503 at once, and
each request in flight has until the grace period's end; one still running then is cancelled
and answered 503. Requests waiting in a model's queue are in flight too: the workers keep
serving until the drain is over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ketch.http.asgi import send_json

#: Sent with every 503 of a stopping server: the request can be retried at once elsewhere
#: (another replica behind the load balancer), or here once the server is back.
RETRY_AFTER_S = 1
#: How long cancelled requests get to hand back their 503 after the grace period.
_CUT_OFF_FLUSH_S = 2.0


@dataclass(frozen=True, slots=True)
class Drained:
    """How a drain went: of the requests in flight when it began, how many finished in the
    grace period and how many were cut off (answered 503)."""

    finished: int
    cut_off: int


class Draining:
    """Tracks the requests in flight in ``app``; see the module docstring.

    :param app: the app that serves requests.
    :param refusal: the app that answers a request arriving while the server drains (it
        reads the request's body first, so that the 503 is not lost to a reset connection).
    """

    def __init__(self, app: ASGIApp, refusal: ASGIApp) -> None:
        self._app = app
        self._refusal = refusal
        #: The task of each request in flight (Hypercorn runs each request in its own).
        self._in_flight: set[asyncio.Task[Any]] = set()
        #: Those the end of the grace period cancelled, to be answered 503.
        self._cut: set[asyncio.Task[Any]] = set()
        self._none_in_flight = asyncio.Event()
        self._none_in_flight.set()
        self._draining = False
        self._cut_off = 0

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        task = asyncio.current_task()
        if self._draining or task is None:
            await self._refusal(scope, receive, send)
            return
        answered = False

        async def sending(message: Message) -> None:
            nonlocal answered
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        self._in_flight.add(task)
        self._none_in_flight.clear()
        try:
            await self._app(scope, receive, sending)
        except asyncio.CancelledError:
            if task not in self._cut:
                raise  # not the end of the grace period: the server's own cancellation
            task.uncancel()
            self._cut_off += 1
            if not answered:
                await send_json(scope, send, 503, _stopping(), {"Retry-After": str(RETRY_AFTER_S)})
        finally:
            self._in_flight.discard(task)
            self._cut.discard(task)
            if not self._in_flight:
                self._none_in_flight.set()

    async def drain(
        self, grace_s: float, hurry: Callable[[], Awaitable[Any]] | None = None
    ) -> Drained:
        """Refuse new requests; give those in flight ``grace_s`` (or until ``hurry`` returns)
        to finish, then cancel and answer the rest. Returns once none is in flight, or when a
        cancelled request ignores its cancellation for too long."""
        self._draining = True
        in_flight, cut_off_before = len(self._in_flight), self._cut_off
        cutting = asyncio.get_running_loop().call_later(grace_s, self._cut_all)
        waited = asyncio.ensure_future(self._none_in_flight.wait())
        hurried = asyncio.ensure_future(hurry()) if hurry is not None else None
        try:
            await asyncio.wait(
                [waited] if hurried is None else [waited, hurried],
                timeout=grace_s + _CUT_OFF_FLUSH_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not waited.done() and hurried is not None and hurried.done():
                self._cut_all()  # asked again to stop: no more grace
                await asyncio.wait([waited], timeout=_CUT_OFF_FLUSH_S)
        finally:
            cutting.cancel()
            waited.cancel()
            if hurried is not None:
                hurried.cancel()
        cut_off = self._cut_off - cut_off_before
        return Drained(finished=in_flight - cut_off - len(self._in_flight), cut_off=cut_off)

    def _cut_all(self) -> None:
        for task in self._in_flight - self._cut:
            self._cut.add(task)
            task.cancel()


def _stopping() -> dict[str, str]:
    return {
        "error": "the server is shutting down: send the request again, to another server "
        "or to this one once it is back"
    }


async def refuse_while_stopping(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer of a stopping server to a request that arrives: 503, retry elsewhere."""
    await send_json(scope, send, 503, _stopping(), {"Retry-After": str(RETRY_AFTER_S)})
