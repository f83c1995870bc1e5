"""Closed-loop Open Inference Protocol load through tritonclient's asyncio clients, for
``bench_protocols.py``: the same client code against ketch and against Triton, over HTTP
(``tritonclient.http.aio``, on aiohttp) or gRPC (``tritonclient.grpc.aio``, on grpcio).

One run is one event loop (uvloop where installed) holding one client: a pooled aiohttp
session that opens a keep-alive connection per request in flight, or one gRPC channel whose
HTTP/2 connection multiplexes them, as a Triton user's asyncio service would hold it.
``concurrency`` tasks each keep exactly one one-row request in flight. Only requests that
complete inside the measured window (after the warm-up) count; ``requests_per_s``, ``p50_ms``
and ``p99_ms`` cover successful ones, ``errors`` the others (each failure is followed by a
10 ms pause, so a dead server is not hammered). Every request has a client-side deadline
(``REQUEST_TIMEOUT_S``), and the tasks still in flight when the window ends get
``DRAIN_TIMEOUT_S`` to finish before they are cancelled.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http.aio as http_aio
from loadgen import LoadResult, _run_loop
from report import percentile

PROTOCOLS = ("http", "grpc")
#: The client-side deadline of every request (the servers' own defaults are 60 s).
REQUEST_TIMEOUT_S = 30.0
#: How long requests in flight at the end of the window may take to finish.
DRAIN_TIMEOUT_S = REQUEST_TIMEOUT_S + 5.0
#: Pause after a failed request before the next one.
ERROR_PAUSE_S = 0.01


@dataclass(frozen=True)
class InferSpec:
    """What to send, where, how hard and for how long.

    :param protocol: ``"http"`` or ``"grpc"``.
    :param address: ``HOST:PORT`` of the server's endpoint for that protocol.
    :param row: the one row sent as ``input_name``, a float32 tensor of shape ``[1, len(row)]``.
    """

    protocol: str
    address: str
    model: str
    input_name: str
    output_name: str
    row: tuple[float, ...]
    concurrency: int = 1
    duration_s: float = 10.0
    warmup_s: float = 2.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError(
                f"need duration_s > 0 and warmup_s >= 0, got {self.duration_s}, {self.warmup_s}"
            )


@dataclass(frozen=True)
class InferResult:
    """The run's figures, and the first failure seen (in the warm-up too), if any."""

    load: LoadResult
    first_error: str | None


class _Client:
    """One tritonclient asyncio client and the request it sends, built once."""

    def __init__(self, spec: InferSpec) -> None:
        self.spec = spec
        module: Any = http_aio if spec.protocol == "http" else grpc_aio
        if spec.protocol == "http":
            self.client: Any = http_aio.InferenceServerClient(
                spec.address,
                conn_limit=max(100, spec.concurrency),
                conn_timeout=REQUEST_TIMEOUT_S,
            )
        else:
            self.client = grpc_aio.InferenceServerClient(spec.address)
        tensor = module.InferInput(spec.input_name, [1, len(spec.row)], "FP32")
        tensor.set_data_from_numpy(np.asarray([spec.row], dtype=np.float32))
        self.inputs = [tensor]

    async def infer(self) -> Any:
        if self.spec.protocol == "grpc":
            return await self.client.infer(
                self.spec.model, self.inputs, client_timeout=REQUEST_TIMEOUT_S
            )
        return await self.client.infer(self.spec.model, self.inputs)

    async def close(self) -> None:
        await self.client.close()


async def _probe(spec: InferSpec) -> np.ndarray:
    client = _Client(spec)
    try:
        result = await client.infer()
        output: np.ndarray = result.as_numpy(spec.output_name)
        return output
    finally:
        await client.close()


def probe(spec: InferSpec) -> np.ndarray:
    """One request of ``spec``'s row; its output ``spec.output_name``. Raises what the client
    raises (``InferenceServerException`` for an error answer or a passed deadline)."""
    return _run_loop(_probe(spec))


async def _drive(spec: InferSpec) -> InferResult:
    client = _Client(spec)
    latencies_ns = array("q")
    errors = 0
    first_error: str | None = None
    loop = asyncio.get_running_loop()
    window_start = time.perf_counter_ns() + int(spec.warmup_s * 1e9)
    window_end = window_start + int(spec.duration_s * 1e9)

    async def closed_loop() -> None:
        nonlocal errors, first_error
        while (sent := time.perf_counter_ns()) < window_end:
            try:
                await client.infer()
            except Exception as exc:  # an error answer, a deadline, a lost connection
                now = time.perf_counter_ns()
                if window_start <= now < window_end:
                    errors += 1
                if first_error is None:
                    first_error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(ERROR_PAUSE_S)
                continue
            now = time.perf_counter_ns()
            if window_start <= now < window_end:
                latencies_ns.append(now - sent)

    cpu_marks: list[float] = []
    loop.call_later(spec.warmup_s, lambda: cpu_marks.append(time.process_time()))
    loop.call_later(spec.warmup_s + spec.duration_s, lambda: cpu_marks.append(time.process_time()))
    tasks = [asyncio.create_task(closed_loop()) for _ in range(spec.concurrency)]
    try:
        _, pending = await asyncio.wait(
            tasks, timeout=spec.warmup_s + spec.duration_s + DRAIN_TIMEOUT_S
        )
        if pending:
            first_error = first_error or f"{len(pending)} requests still in flight; cancelled"
            errors += len(pending)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
    cpu_s = cpu_marks[1] - cpu_marks[0] if len(cpu_marks) == 2 else float("nan")
    ordered = sorted(latencies_ns)
    load = LoadResult(
        connections=spec.concurrency,
        duration_s=spec.duration_s,
        requests=len(ordered),
        errors=errors,
        requests_per_s=len(ordered) / spec.duration_s,
        p50_ms=percentile(ordered, 0.50) / 1e6,
        p99_ms=percentile(ordered, 0.99) / 1e6,
        client_cpu_cores=cpu_s / spec.duration_s,
    )
    return InferResult(load, first_error)


def run_infer_load(spec: InferSpec) -> InferResult:
    """Run the closed-loop load of ``spec`` on an event loop of its own and return its figures."""
    return _run_loop(_drive(spec))
