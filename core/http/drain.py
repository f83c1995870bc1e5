"""ASGI middleware that reads whatever a handler left of its request's body before the answer
ends.

An HTTP/1.1 server can only read the next request on a keep-alive connection once this one's
body is read. A handler that answers without reading it (an unknown route, a refused token, an
unknown model found from the path) would otherwise leave the server to close the connection,
and a client that already sent its next request on it sees it closed with no answer.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class DrainRequestBody:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self._app(scope, receive, send)
            return
        body_done = False

        async def receive_tracked() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def send_after_body(message: Message) -> None:
            nonlocal body_done
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if last and not body_done:
                while not body_done:
                    await receive_tracked()
            await send(message)

        await self._app(scope, receive_tracked, send_after_body)


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False
