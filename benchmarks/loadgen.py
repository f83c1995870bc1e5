"""A closed-loop HTTP/1.1 load generator that stays cheap on CPU.

It shares a small machine with the server it measures, so every CPU cycle it spends is one the
server does not get. That is why it is built on raw asyncio protocols (on uvloop where
installed) instead of an HTTP client library: the request bytes are built once, and a response
is parsed only as far as its status line and ``Content-Length``. Chunked responses are not
supported; a response without ``Content-Length`` counts as an error.

Each connection is a closed loop: send one POST, wait for the whole response, send the next.
Only responses that complete inside the measured window (after the warm-up) are counted;
``requests_per_s``, ``p50_ms`` and ``p99_ms`` cover 2xx responses only, and ``errors`` counts
non-2xx responses, malformed responses and lost or refused connections.

Library use::

    result = run_load(LoadSpec(url="http://127.0.0.1:8000/models/double/predict",
                               body=b'{"input": 21}', connections=64))

Command line::

    python benchmarks/loadgen.py --url http://127.0.0.1:8000/models/double/predict \\
        --body '{"input": 21}' --connections 64 --duration 10 --warmup 2 --processes 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import sys
import time
from array import array
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Barrier
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

T = TypeVar("T")

#: A response head larger than this is treated as garbage rather than buffered forever.
MAX_HEAD_BYTES = 64 * 1024
#: Pause before reconnecting a lost connection, so a dead server is not hammered in a hot loop.
RECONNECT_DELAY_S = 0.01
#: How long worker processes may take to start, connect and meet at the start line.
WORKER_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LoadSpec:
    """What to send, how hard and for how long.

    :param url: ``http://host:port/path`` to POST to (no TLS).
    :param body: the request body, sent unchanged with every request.
    :param connections: keep-alive connections, each with one request in flight at a time.
    :param duration_s: length of the measured window.
    :param warmup_s: load applied before the window opens, not counted.
    :param processes: worker processes the connections are spread over; 1 runs in-process.
    :param content_type: the ``Content-Type`` header of every request.
    """

    url: str
    body: bytes
    connections: int = 64
    duration_s: float = 10.0
    warmup_s: float = 2.0
    processes: int = 1
    content_type: str = "application/json"

    def __post_init__(self) -> None:
        if self.connections < 1:
            raise ValueError(f"connections must be at least 1, got {self.connections}")
        if self.processes < 1:
            raise ValueError(f"processes must be at least 1, got {self.processes}")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError(
                f"need duration_s > 0 and warmup_s >= 0, got {self.duration_s}, {self.warmup_s}"
            )


@dataclass(frozen=True)
class LoadResult:
    """The figures of one run; latencies are of 2xx responses inside the measured window."""

    connections: int
    duration_s: float
    requests: int
    errors: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    #: CPU time the load generator itself used in the window, as a share of one core (1.0 = 100%).
    client_cpu_cores: float

    def summary(self) -> str:
        return (
            f"{self.connections} connections, {self.duration_s:g} s: "
            f"{self.requests_per_s:.1f} req/s, p50 {self.p50_ms:.3f} ms, "
            f"p99 {self.p99_ms:.3f} ms, {self.errors} errors "
            f"(load generator CPU {100 * self.client_cpu_cores:.0f}% of one core)"
        )


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    request: bytes


def _build_target(spec: LoadSpec) -> _Target:
    parts = urlsplit(spec.url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"expected a URL like http://127.0.0.1:8000/path, got {spec.url!r}")
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    host_header = parts.netloc.rpartition("@")[2]
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host_header}\r\n"
        f"Content-Type: {spec.content_type}\r\n"
        f"Content-Length: {len(spec.body)}\r\n"
        "\r\n"
    )
    return _Target(parts.hostname, port, head.encode("latin-1") + spec.body)


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """Return (status, body length, server will close) from a response head.

    Raises ``ValueError`` for anything this minimal parser does not understand.
    """
    if not head.startswith(b"HTTP/1.") or len(head) < 12:
        raise ValueError(f"not an HTTP/1.x status line: {head[:40]!r}")
    status = int(head[9:12])
    lowered = head.lower()
    start = lowered.find(b"\r\ncontent-length:")
    if start < 0:
        if status in (204, 304) or 100 <= status < 200:
            return status, 0, False
        raise ValueError("response without Content-Length (chunked bodies are not supported)")
    start += len(b"\r\ncontent-length:")
    end = lowered.find(b"\r\n", start)
    length = int(lowered[start : end if end >= 0 else len(lowered)])
    closes = b"\r\nconnection: close" in lowered
    return status, length, closes


class _Run:
    """State shared by the connections of one process: the clock and the tallies."""

    def __init__(self, target: _Target) -> None:
        self.target = target
        self.sending = False
        self.window_start_ns = 0
        self.window_end_ns = 0
        self.latencies_ns = array("q")
        self.errors = 0
        self.connections: list[_Connection] = []
        self.reconnects: set[asyncio.Task[None]] = set()

    def record(self, status: int, latency_ns: int, now_ns: int) -> None:
        if self.window_start_ns <= now_ns < self.window_end_ns:
            if 200 <= status < 300:
                self.latencies_ns.append(latency_ns)
            else:
                self.errors += 1

    def record_error(self, now_ns: int) -> None:
        if self.window_start_ns <= now_ns < self.window_end_ns:
            self.errors += 1


class _Connection(asyncio.Protocol):
    """One keep-alive connection that sends the next request as soon as a response completes.

    The same object is reused as the protocol of each reconnection, so the run keeps one
    handle per connection slot for its whole life.
    """

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._need = -1  # length of the response being read, -1 until its head is parsed
        self._status = 0
        self._closes = False
        self._sent_ns = 0
        self._closing = False  # closed by us at the end, so its loss is not an error

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's TCP transports do not subclass
        # asyncio.Transport, although they implement it.
        self._transport = cast(asyncio.Transport, transport)
        self._buffer.clear()
        self._need = -1
        if self._run.sending:
            self.send()

    def send(self) -> None:
        if self._transport is None:
            return
        self._sent_ns = time.perf_counter_ns()
        self._transport.write(self._run.target.request)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._need < 0:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    self._abort()
                return
            try:
                self._status, length, self._closes = _parse_head(bytes(buffer[:head_end]))
            except ValueError:
                self._abort()
                return
            self._need = head_end + 4 + length
        if len(buffer) < self._need:
            return
        now = time.perf_counter_ns()
        del buffer[: self._need]
        self._need = -1
        self._run.record(self._status, now - self._sent_ns, now)
        if self._closes and self._transport is not None:
            # Not an error: the server said so. connection_lost reconnects without counting it.
            self._transport.close()
        elif self._run.sending:
            self.send()

    def _abort(self) -> None:
        # connection_lost counts the error and reconnects; one path for every failure.
        self._closes = False
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._closing or not self._run.sending:
            return
        if not self._closes:
            self._run.record_error(time.perf_counter_ns())
        self._closes = False
        asyncio.get_running_loop().call_later(RECONNECT_DELAY_S, self._reconnect)

    def _reconnect(self) -> None:
        if not self._run.sending:
            return
        task = asyncio.get_running_loop().create_task(self.connect())
        self._run.reconnects.add(task)
        task.add_done_callback(self._run.reconnects.discard)

    async def connect(self) -> None:
        target = self._run.target
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: self, target.host, target.port
            )
        except OSError:
            if not self._run.sending:
                raise
            self._run.record_error(time.perf_counter_ns())
            asyncio.get_running_loop().call_later(RECONNECT_DELAY_S, self._reconnect)

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()


@dataclass(frozen=True)
class _Tally:
    """What one process measured; plain data so it crosses a process boundary cheaply."""

    latencies_ns: bytes
    errors: int
    cpu_s: float


async def connect_all(connections: list[_Connection], target: _Target) -> None:
    """Open every connection, or raise ConnectionError naming the first failure."""
    # return_exceptions: let every attempt finish, so none connects after the caller's cleanup.
    outcomes = await asyncio.gather(
        *(conn.connect() for conn in connections), return_exceptions=True
    )
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    if failures:
        raise ConnectionError(
            f"cannot connect to {target.host}:{target.port}: {failures[0]}; is the server running?"
        ) from failures[0]


async def _drive(
    target: _Target,
    connections: int,
    warmup_s: float,
    duration_s: float,
    start_line: Barrier | None = None,
) -> _Tally:
    run = _Run(target)
    run.connections = [_Connection(run) for _ in range(connections)]
    try:
        await connect_all(run.connections, target)
        if start_line is not None:
            # Every worker process opens its connections first, so load starts everywhere
            # at nearly the same moment and the measured windows overlap.
            await asyncio.to_thread(start_line.wait, WORKER_START_TIMEOUT_S)
        loop = asyncio.get_running_loop()
        start_ns = time.perf_counter_ns()
        run.window_start_ns = start_ns + int(warmup_s * 1e9)
        run.window_end_ns = run.window_start_ns + int(duration_s * 1e9)
        cpu_marks: list[float] = []
        loop.call_later(warmup_s, lambda: cpu_marks.append(time.process_time()))
        run.sending = True
        for conn in run.connections:
            conn.send()
        await asyncio.sleep(warmup_s + duration_s)
        cpu_marks.append(time.process_time())
        cpu_s = cpu_marks[-1] - cpu_marks[0]
    finally:
        run.sending = False
        for task in run.reconnects:
            task.cancel()
        for conn in run.connections:
            conn.close()
    return _Tally(run.latencies_ns.tobytes(), run.errors, cpu_s)


def _percentile_ms(sorted_ns: Sequence[int], fraction: float) -> float:
    """Nearest-rank percentile, in milliseconds; NaN when nothing succeeded."""
    if not sorted_ns:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1e6


def _merge(spec: LoadSpec, tallies: Sequence[_Tally]) -> LoadResult:
    latencies = array("q")
    for tally in tallies:
        latencies.frombytes(tally.latencies_ns)
    ordered = sorted(latencies)
    return LoadResult(
        connections=spec.connections,
        duration_s=spec.duration_s,
        requests=len(ordered),
        errors=sum(t.errors for t in tallies),
        requests_per_s=len(ordered) / spec.duration_s,
        p50_ms=_percentile_ms(ordered, 0.50),
        p99_ms=_percentile_ms(ordered, 0.99),
        client_cpu_cores=sum(t.cpu_s for t in tallies) / spec.duration_s,
    )


async def measure(spec: LoadSpec) -> LoadResult:
    """Run the load on the current event loop (one process; ``spec.processes`` is ignored)."""
    target = _build_target(spec)
    tally = await _drive(target, spec.connections, spec.warmup_s, spec.duration_s)
    return _merge(spec, [tally])


def _run_loop(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # uvloop is optional; asyncio's own loop just costs more CPU
        return asyncio.run(main)
    return uvloop.run(main)


def _worker(
    target: _Target,
    connections: int,
    spec: LoadSpec,
    start_line: Barrier,
    results: Connection,
) -> None:
    try:
        tally = _run_loop(_drive(target, connections, spec.warmup_s, spec.duration_s, start_line))
    except BaseException as exc:
        start_line.abort()  # release the other workers instead of leaving them at the barrier
        results.send(f"{type(exc).__name__}: {exc}")
        raise
    results.send(tally)


def _split(total: int, parts: int) -> list[int]:
    share, extra = divmod(total, parts)
    return [share + (1 if i < extra else 0) for i in range(parts)]


def _run_processes(spec: LoadSpec, target: _Target) -> LoadResult:
    processes = min(spec.processes, spec.connections)
    # spawn, not fork: the caller may have an event loop or threads that fork would copy.
    context = multiprocessing.get_context("spawn")
    start_line = context.Barrier(processes)
    workers: list[tuple[SpawnProcess, Connection]] = []
    try:
        for connections in _split(spec.connections, processes):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_worker,
                args=(target, connections, spec, start_line, sender),
                daemon=True,
            )
            process.start()
            sender.close()
            workers.append((process, receiver))
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S + spec.warmup_s + spec.duration_s
        tallies: list[_Tally] = []
        for process, receiver in workers:
            if not receiver.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"load worker pid {process.pid} sent no result in time")
            try:
                outcome = receiver.recv()
            except EOFError:
                raise RuntimeError(
                    f"load worker pid {process.pid} died (exit code {process.exitcode})"
                ) from None
            if isinstance(outcome, str):
                raise RuntimeError(f"load worker pid {process.pid} failed: {outcome}")
            tallies.append(outcome)
        return _merge(spec, tallies)
    finally:
        for process, receiver in workers:
            receiver.close()
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join()


def run_load(spec: LoadSpec) -> LoadResult:
    """Run the load described by ``spec`` and return its figures.

    Starts its own event loop (or ``spec.processes`` worker processes), so call it from
    synchronous code; inside a running loop use :func:`measure`.
    """
    target = _build_target(spec)
    if spec.processes == 1:
        tally = _run_loop(_drive(target, spec.connections, spec.warmup_s, spec.duration_s))
        return _merge(spec, [tally])
    return _run_processes(spec, target)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", required=True, help="http://host:port/path to POST to")
    parser.add_argument("--body", default='{"input": 21}', help="default: %(default)s")
    parser.add_argument("--content-type", default="application/json")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--processes", type=int, default=1, help="spread connections over K")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = parser.parse_args(argv)
    try:
        spec = LoadSpec(
            url=args.url,
            body=args.body.encode(),
            connections=args.connections,
            duration_s=args.duration,
            warmup_s=args.warmup,
            processes=args.processes,
            content_type=args.content_type,
        )
        result = run_load(spec)
    except (ValueError, ConnectionError, RuntimeError, TimeoutError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    if args.json:
        print(json.dumps(asdict(result)))
    # Non-zero when the figures describe a failing server rather than a working one.
    return 1 if result.errors or not result.requests else 0


if __name__ == "__main__":
    sys.exit(main())
