"""Driving bench_batching.py: the server's checks, then each model's closed-loop run.

Once ``ketch serve`` is ready, every model must have its one worker (the adaptive ones at a
``batch_limit`` of 1) and each single model must answer right; then each model in turn gets
``loadgen``'s closed loop, with failures counted by status, while a :class:`Sampler` reads its
``GET /models`` entry; after its run, each adaptive model must answer as its single twin does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batching_models import BURN_BODY, VARIANTS, matmul_body, model_name
from batching_report import Report, RunReport, Sample
from ketch_server import WORKER_LOST, KetchServer
from loadgen import (
    LoadSpec,
    _build_target,
    _Connection,
    _merge,
    _Run,
    _run_loop,
    _Tally,
    _Target,
    connect_all,
)
from procstat import CpuSample, CpuShares
from server_process import ServerError

#: The deadline of a request sent by hand (it may queue behind what a run left over).
PROBE_TIMEOUT_S = 30.0


class BenchmarkError(Exception):
    """A figure could not be measured; the message says why."""


class _StatusRun(_Run):
    """loadgen's run state, also counting the failures by status, in warm-up and window."""

    def __init__(self, target: _Target) -> None:
        super().__init__(target)
        self.warmup_errors: Counter[str] = Counter()
        self.window_errors: Counter[str] = Counter()

    def record(self, status: int, latency_ns: int, now_ns: int) -> None:
        super().record(status, latency_ns, now_ns)
        if not 200 <= status < 300:
            self._count(str(status), now_ns)

    def record_error(self, now_ns: int) -> None:
        super().record_error(now_ns)
        self._count("connection", now_ns)

    def _count(self, what: str, now_ns: int) -> None:
        if now_ns < self.window_start_ns:
            self.warmup_errors[what] += 1
        elif now_ns < self.window_end_ns:
            self.window_errors[what] += 1


class Sampler:
    """Reads the model's ``GET /models`` entry once before the load, then every ``interval_s``
    in a thread while it runs, then once after it.

    The interval is the sampling rate, not a wait for anything: the load runs meanwhile.
    """

    def __init__(self, server: KetchServer, model: str, interval_s: float) -> None:
        self._server = server
        self._model = model
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="models-sampler", daemon=True)
        #: (perf_counter_ns when read, the model's entry) per reading.
        self._readings: list[tuple[int, dict[str, Any]]] = []
        self.failures: list[str] = []

    def start(self) -> None:
        """Take the first reading now (just before the load starts), then sample in a thread."""
        self._take()
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling; then take one last reading, the state the load left behind."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self._take()

    def samples(self, origin_ns: int) -> list[Sample]:
        """The readings, timed in seconds since ``origin_ns`` (the load's start)."""
        samples = []
        for at_ns, status in self._readings:
            workers = status.get("workers") or []
            batching = status.get("batching") or {}
            samples.append(
                Sample(
                    t_s=round((at_ns - origin_ns) / 1e9, 3),
                    batch_limit=workers[0].get("batch_limit") if workers else None,
                    last_batch_size=batching.get("last_batch_size"),
                    queue_depth=status.get("queue_depth"),
                    expired=status.get("expired"),
                )
            )
        return samples

    def _loop(self) -> None:
        due = time.monotonic()
        while True:
            due += self._interval_s
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            self._take()

    def _take(self) -> None:
        try:
            status = self._server.model_status(self._model)
        except ServerError as exc:
            self.failures.append(str(exc))
            return
        self._readings.append((time.perf_counter_ns(), status))


async def _drive(spec: LoadSpec, sampler: Sampler) -> tuple[_StatusRun, float]:
    """loadgen's closed loop, with failures counted by status and the sampler started just
    before the load; returns the tallies and the load generator's CPU seconds in the window."""
    target = _build_target(spec)
    run = _StatusRun(target)
    run.connections = [_Connection(run) for _ in range(spec.connections)]
    try:
        try:
            await connect_all(run.connections, target)
        except ConnectionError as exc:
            raise BenchmarkError(str(exc)) from exc
        loop = asyncio.get_running_loop()
        sampler.start()
        start_ns = time.perf_counter_ns()
        run.window_start_ns = start_ns + int(spec.warmup_s * 1e9)
        run.window_end_ns = run.window_start_ns + int(spec.duration_s * 1e9)
        start_cpu = time.process_time()
        window_cpu: list[float] = []  # the load generator's CPU time when the window opens
        loop.call_later(spec.warmup_s, lambda: window_cpu.append(time.process_time()))
        run.sending = True
        for conn in run.connections:
            conn.send()
        await asyncio.sleep(spec.warmup_s + spec.duration_s)  # the run's length, not a wait
        cpu_s = time.process_time() - (window_cpu[0] if window_cpu else start_cpu)
    finally:
        run.sending = False
        for task in run.reconnects:
            task.cancel()
        for conn in run.connections:
            conn.close()
    return run, cpu_s


def _measure_run(
    server: KetchServer, case: str, variant: str, body: bytes, args: argparse.Namespace
) -> RunReport:
    model = model_name(case, variant)
    report = RunReport(case, variant, model)
    spec = LoadSpec(
        url=f"{server.base_url}/models/{model}/predict",
        body=body,
        connections=args.connections,
        duration_s=args.duration,
        warmup_s=args.warmup,
    )
    print(
        f"  {model}: {args.connections} connections, {args.warmup:g} s warm-up + "
        f"{args.duration:g} s ...",
        file=sys.stderr,
        flush=True,
    )
    sampler = Sampler(server, model, args.sample_interval)
    before = CpuSample.take(server.pgid)
    try:
        run, cpu_s = _run_loop(_drive(spec, sampler))
    finally:
        sampler.stop()
    report.cpu = CpuShares.between(before, CpuSample.take(server.pgid))
    tally = _Tally(run.latencies_ns.tobytes(), run.errors, cpu_s)
    report.result = _merge(spec, [tally])
    report.window_errors = dict(run.window_errors)
    report.warmup_errors = dict(run.warmup_errors)
    report.samples = sampler.samples(run.window_start_ns - int(spec.warmup_s * 1e9))
    if sampler.failures:
        raise BenchmarkError(f"GET /models failed during the run: {sampler.failures[0]}")
    return report


def _predict(url: str, body: bytes) -> Any:
    """POST one request and return its ``output``; anything but a 200 raises.

    The request sets its own deadline: right after a run the queue may still hold requests of
    closed connections, which a probe under the model's ``slo_ms`` could wait behind.
    """
    request_body = json.loads(body)
    request_body["timeout_ms"] = PROBE_TIMEOUT_S * 1000
    request = urllib.request.Request(
        url,
        data=json.dumps(request_body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S + 5) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise BenchmarkError(f"POST {url} answered {exc.code}: {detail}") from exc
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"POST {url} failed: {exc}") from exc
    if not isinstance(payload, dict) or "output" not in payload:
        raise BenchmarkError(f"POST {url} answered {payload!r}, not a JSON object with output")
    return payload["output"]


def _check_answer(case: str, url: str, body: bytes, expected: float | None) -> float:
    """The model's answer to ``body``, checked: ``burn`` echoes its input, ``matmul`` answers
    a finite number, the same (to float32 rounding) as ``expected`` when given."""
    output = _predict(url, body)
    if case == "burn":
        if output != 1:
            raise BenchmarkError(f"POST {url} answered {output!r}, expected 1")
        return 1.0
    if not isinstance(output, int | float) or not math.isfinite(output):
        raise BenchmarkError(f"POST {url} answered {output!r}, expected a finite number")
    if expected is not None and not math.isclose(output, expected, rel_tol=1e-3, abs_tol=1e-2):
        raise BenchmarkError(
            f"POST {url} answered {output!r}, but the single model answered {expected!r}"
        )
    return float(output)


def _check_pools(server: KetchServer, cases: Sequence[str]) -> None:
    """Every model has its one worker ready, and the adaptive ones start at a limit of 1."""
    for case in cases:
        for variant in VARIANTS:
            status = server.model_status(model_name(case, variant))
            ready = (status.get("replicas") or {}).get("ready")
            if ready != 1:
                raise BenchmarkError(
                    f"{model_name(case, variant)} should have 1 worker ready, GET /models says "
                    f"{status}"
                )
            limit = (status.get("workers") or [{}])[0].get("batch_limit")
            if variant == "adaptive" and limit != 1:
                raise BenchmarkError(
                    f"{model_name(case, variant)} should start at batch_limit 1, "
                    f"GET /models says {limit!r}"
                )


def _worker_trouble(server: KetchServer, cases: Sequence[str]) -> list[str]:
    """Workers lost or models unhealthy, from the lines printed so far and ``GET /models``."""
    trouble: list[str] = []
    while True:
        try:
            line = server.next_line(0.0)
        except ServerError as exc:
            trouble.append(f"the server stopped: {exc}")
            break
        if line is None:
            break
        if WORKER_LOST.match(line) or " unhealthy: " in line:
            trouble.append(line)
    for case in cases:
        for variant in VARIANTS:
            status = server.model_status(model_name(case, variant))
            if status.get("worker_exits"):
                trouble.append(
                    f"{status['name']}: {status['worker_exits']} worker exit(s), last error "
                    f"{status.get('last_error')!r}"
                )
    return trouble


def _run_all(server: KetchServer, args: argparse.Namespace, report: Report) -> None:
    bodies = {"burn": BURN_BODY, "matmul": matmul_body(args.matmul_dim)}
    server.start(args.startup_timeout)
    _check_pools(server, args.cases)
    answers: dict[str, float] = {}
    for case in args.cases:
        url = f"{server.base_url}/models/{model_name(case, 'single')}/predict"
        answers[case] = _check_answer(case, url, bodies[case], None)
    for case in args.cases:
        for variant in VARIANTS:
            report.runs.append(_measure_run(server, case, variant, bodies[case], args))
        # Checked after its run, so the run starts from the worker's first limit.
        url = f"{server.base_url}/models/{model_name(case, 'adaptive')}/predict"
        _check_answer(case, url, bodies[case], answers[case])
    report.warnings.extend(_worker_trouble(server, args.cases))


def measure(args: argparse.Namespace, models_file: Path, report: Report) -> None:
    server = KetchServer(models_file)
    try:
        with server:
            try:
                _run_all(server, args, report)
            except (BenchmarkError, OSError) as exc:
                # What the server said, read while it still runs (a ServerError quotes it).
                raise BenchmarkError(f"{exc}\n{server.diagnostics()}") from exc
    except (BenchmarkError, ServerError, RuntimeError, TimeoutError) as exc:
        report.failures.append(str(exc))
    report.server_exit_code = server.exit_code
    report.warnings.extend(f"ketch {warning}" for warning in server.stop_warnings)
