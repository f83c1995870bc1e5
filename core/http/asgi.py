"""What the layers in front of the Starlette app (:mod:`ketch.http.limits`,
:mod:`ketch.http.draining`) need of raw ASGI: whether a request has a body, its declared length,
the size of its headers, and a JSON answer sent without Starlette.

Their answers close HTTP/1 connections (``Connection: close``): they are given when the
request's body was not read to its end, or when the server is going away, and either way the
connection cannot carry another request. HTTP/2 has no such header (a stream ends on its own).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.types import Scope, Send


def may_have_body(scope: Scope) -> bool:
    """Whether the request may have a body: it announces one, or it is an HTTP/2 request,
    whose body may come without a length (then the server says so once it has ended)."""
    return has_body(scope) or scope.get("http_version", "1.1") not in ("1.0", "1.1")


def has_body(scope: Scope) -> bool:
    """Whether the request announces a body (a length above 0, or chunks)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


def head_size(scope: Scope) -> int:
    """The bytes of the request's target and headers, as sent (give or take separators)."""
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    return size + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


def declared_length(scope: Scope) -> int | None:
    """The request's ``Content-Length``, or None when it sends chunks (or says nothing)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 and h2 refuse a malformed length before the app sees it
    return None


async def send_json(
    scope: Scope,
    send: Send,
    status: int,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer ``body`` as JSON with ``status``, closing an HTTP/1 connection afterwards."""
    content = orjson.dumps(body)
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in (headers or {}).items()),
    ]
    if scope.get("http_version", "1.1") in ("1.0", "1.1"):
        raw_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": content})
