"""The bare baseline ketch's gateway is measured against.

One Starlette route that does in-process what ketch's quickstart ``double`` model does through
its gateway, queue, broker and worker: parse the JSON body with orjson, double the input, and
answer in ketch's JSON shape. It is served through ``ketch.http.server``, the module ketch's own
gateway uses, so both run on exactly the same Hypercorn settings and event loop; the difference
between the two is therefore what ketch adds on top of a plain ASGI app.

Run it as ``python benchmarks/baseline_app.py --host 127.0.0.1 --port 0``. Like ``ketch
serve`` it prints ``ketch: listening on http://HOST:PORT`` and then ``ketch: ready``, and it
stops gracefully on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ketch.http.server import bind_tcp, run_event_loop, serve_asgi

MODEL_NAME = "double"
MODEL_VERSION = "1"


def _json(payload: dict[str, Any], status_code: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status_code, media_type="application/json")


async def predict(request: Request) -> Response:
    try:
        payload = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        return _json({"error": f"request body is not valid JSON: {exc}"}, 400)
    if isinstance(payload, dict) and "input" in payload:
        reply: dict[str, Any] = {"output": 2 * payload["input"]}
    elif isinstance(payload, dict) and isinstance(payload.get("inputs"), list):
        reply = {"outputs": [2 * x for x in payload["inputs"]]}
    else:
        return _json({"error": 'expected a JSON body {"input": x} or {"inputs": [x, ...]}'}, 400)
    reply.update(model=MODEL_NAME, version=MODEL_VERSION, query_id=uuid.uuid4().hex)
    return _json(reply)


@contextlib.asynccontextmanager
async def _announce_ready(app: Starlette) -> AsyncIterator[None]:
    # Hypercorn runs the lifespan startup just before it starts accepting; the socket is
    # already listening, so a client that connects on seeing this line waits in the kernel's
    # backlog for a moment rather than being refused.
    print("ketch: ready", flush=True)
    yield


def build_app() -> Starlette:
    return Starlette(
        routes=[Route(f"/models/{MODEL_NAME}/predict", predict, methods=["POST"])],
        lifespan=_announce_ready,
    )


async def _serve(sock: socket.socket) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except NotImplementedError:  # Windows' event loops have no add_signal_handler
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop.set))
    # Starlette's ASGI types and Hypercorn's describe the same protocol but do not unify
    # under mypy, hence the cast.
    await serve_asgi(cast(Any, build_app()), sock, stop.wait)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the bare baseline app for benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    args = parser.parse_args(argv)
    try:
        sock = bind_tcp(args.host, args.port)
    except OSError as exc:
        print(f"baseline_app: {exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    print(f"ketch: listening on http://{_url_host(host)}:{port}", flush=True)
    run_event_loop(_serve(sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
