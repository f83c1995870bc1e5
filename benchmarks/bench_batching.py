"""Throughput and p99 of a batch-friendly model: batching off against adaptive batching.

This writes one models file to a temporary directory with two cases, each as a pair of models
that differ only in how they batch::

    @ketch.model(max_batch_size=1, min_replicas=1, max_replicas=1)  # *_single
    @ketch.model(max_batch_size=64, max_delay_ms=2, slo_ms=100,     # *_adaptive
                 min_replicas=1, max_replicas=1)

- ``burn``: a busy loop on ``time.thread_time()`` for 10 ms per call plus 0.1 ms per input
  (``--burn-ms``, ``--per-input-ms``). Thread CPU time, so a busy machine stretches the loop's
  wall time but not the work it does;
- ``matmul``: a real numpy product: the function (annotated ``np.ndarray``) gets the batch
  stacked as one ``(n, D)`` array and answers ``(xs @ W).sum(axis=1)``, one figure per input,
  with ``W`` a ``(D, D)`` float32 matrix built at import from a seeded RNG. ``D`` is 5120
  (``--matmul-dim``), where one call on one input costs about 10 ms with the one BLAS thread
  (``threads=1``, ``--matmul-threads``) each worker gets; the product is computed as
  ``W.T @ xs.T``, which OpenBLAS does about twice as fast as ``xs @ W`` for batches of a few
  rows. A request's input is ``D`` small integers, which the model makes float32.

One worker per model (``max_replicas=1``: the comparison is about batching, not scaling out),
started with the server (``min_replicas=1``: no cold start in the runs). ``max_delay_ms=2``
(``--max-delay-ms``) lets the answered clients' next requests join the batch that follows;
with 0, a closed loop of 64 connections makes a worker alternate a full batch with a batch of
the one input left over, paying the fixed cost twice.

It serves the file once with ``ketch serve``, waits for ``ketch: ready`` (with a deadline),
checks each model's pool in ``GET /models`` and each single model's answer, and then, for
each case, drives the single and the adaptive model in turn with ``--connections`` (64)
closed-loop keep-alive connections: ``--warmup`` (2 s) unmeasured, then ``--duration`` (10 s)
measured. A sampler thread reads ``GET /models`` every ``--sample-interval`` (0.5 s) during
each run, so the adaptive worker's ``batch_limit`` can be printed as it moves. It prints req/s,
p50, p99 and errors by status (a 504 is an error), the ratio adaptive / single throughput
against the target (at least 8x) and whether the adaptive p99 is under the objective
(``slo_ms``).

The exit code is non-zero when a figure could not be measured (a server or probe failure, a
run without answers, no ``batch_limit`` in ``GET /models``) or a run's measured window had
more than a handful of errors; a missed target only prints ``NOT met``.

Run from anywhere: ``python benchmarks/bench_batching.py [--duration 5] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ketch_server import WORKER_LOST, KetchServer, write_models
from loadgen import (
    LoadResult,
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
from report import finite
from server_process import ServerError

CASES = ("burn", "matmul")
VARIANTS = ("single", "adaptive")
#: Adaptive batching should answer at least this many times the requests of batch size 1.
THROUGHPUT_TARGET = 8.0
#: Errors a run's measured window may have before the exit code says the run failed. Errors
#: in the warm-up are printed, not failed on: an adaptive worker starts at a batch size of 1,
#: and a burst of 64 requests can outwait its first few batches (a 504 each).
ALLOWED_ERRORS = 5
#: CPU taken by unrelated processes during a run, in cores, above which figures are suspect.
NOISY_OTHER_CPU = 0.25
#: The deadline of a request sent by hand (it may queue behind what a run left over).
PROBE_TIMEOUT_S = 30.0
#: The seed of the matmul model's weight matrix.
SEED = 20240601
BURN_BODY = b'{"input": 1}'

MODELS_SOURCE = """
    import time

    import numpy as np

    import ketch

    BURN_S = {burn_ms!r} / 1000
    PER_INPUT_S = {per_input_ms!r} / 1000
    DIM = {dim!r}
    # The weight matrix W, stored transposed: W_T @ xs.T is xs @ W with the big matrix on the
    # left, which OpenBLAS computes about twice as fast for batches of a few rows.
    W_T = np.random.default_rng({seed!r}).standard_normal((DIM, DIM), dtype=np.float32)


    def _burn(xs):
        # CPU time of this thread, not a sleep or wall time: noise stretches the loop's wall
        # time, not the work it does.
        end = time.thread_time() + BURN_S + len(xs) * PER_INPUT_S
        while time.thread_time() < end:
            pass
        return xs


    def _matmul(xs):
        # JSON integers arrive as int64; (xs @ W).sum(axis=1), one figure per input.
        batch = np.asarray(xs, dtype=np.float32)
        return (W_T @ batch.T).sum(axis=0)


    @ketch.model(max_batch_size=1, min_replicas=1, max_replicas=1)
    def burn_single(xs):
        return _burn(xs)


    @ketch.model(
        max_batch_size={max_batch_size!r},
        max_delay_ms={max_delay_ms!r},
        slo_ms={slo_ms!r},
        min_replicas=1,
        max_replicas=1,
    )
    def burn_adaptive(xs):
        return _burn(xs)


    @ketch.model(max_batch_size=1, min_replicas=1, max_replicas=1, threads={threads!r})
    def matmul_single(xs: np.ndarray) -> np.ndarray:
        return _matmul(xs)


    @ketch.model(
        max_batch_size={max_batch_size!r},
        max_delay_ms={max_delay_ms!r},
        slo_ms={slo_ms!r},
        min_replicas=1,
        max_replicas=1,
        threads={threads!r},
    )
    def matmul_adaptive(xs: np.ndarray) -> np.ndarray:
        return _matmul(xs)
"""


class BenchmarkError(Exception):
    """A figure could not be measured; the message says why."""


def model_name(case: str, variant: str) -> str:
    return f"{case}_{variant}"


def matmul_body(dim: int) -> bytes:
    """One input of ``dim`` small integers (short JSON; the model makes them float32)."""
    return json.dumps({"input": [i % 7 - 3 for i in range(dim)]}, separators=(",", ":")).encode()


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


@dataclass(frozen=True)
class Sample:
    """One reading of the model's entry in ``GET /models``."""

    #: Seconds since the load started (the warm-up's first request).
    t_s: float
    #: The worker's batch size limit (its AIMD state), None when no worker was listed.
    batch_limit: int | None
    last_batch_size: int | None
    queue_depth: int | None
    expired: int | None


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


@dataclass
class RunReport:
    case: str
    variant: str
    model: str
    result: LoadResult | None = None
    #: Failures by status ("504", "connection", ...) in the measured window and in the warm-up.
    window_errors: dict[str, int] = field(default_factory=dict)
    warmup_errors: dict[str, int] = field(default_factory=dict)
    cpu: CpuShares | None = None
    samples: list[Sample] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(self.window_errors.values())

    @property
    def limits(self) -> list[int | None]:
        return [s.batch_limit for s in self.samples]

    @property
    def final_batch_limit(self) -> int | None:
        return self.samples[-1].batch_limit if self.samples else None


@dataclass
class CaseReport:
    case: str
    single: RunReport | None = None
    adaptive: RunReport | None = None
    #: adaptive req/s / single req/s.
    throughput_ratio: float | None = None
    ratio_met: bool | None = None
    adaptive_p99_met: bool | None = None


@dataclass
class Report:
    args: dict[str, Any]
    runs: list[RunReport] = field(default_factory=list)
    cases: list[CaseReport] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    server_exit_code: int | None = None


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


def _measure(args: argparse.Namespace, models_file: Path, report: Report) -> None:
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


def _summarise(report: Report, slo_ms: float) -> None:
    for case in dict.fromkeys(run.case for run in report.runs):
        runs = {run.variant: run for run in report.runs if run.case == case}
        summary = CaseReport(case, runs.get("single"), runs.get("adaptive"))
        single = summary.single.result if summary.single else None
        adaptive = summary.adaptive.result if summary.adaptive else None
        if single and adaptive and single.requests_per_s > 0:
            summary.throughput_ratio = adaptive.requests_per_s / single.requests_per_s
            summary.ratio_met = summary.throughput_ratio >= THROUGHPUT_TARGET
        if adaptive and math.isfinite(adaptive.p99_ms):
            summary.adaptive_p99_met = adaptive.p99_ms < slo_ms
        report.cases.append(summary)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _by_status(errors: dict[str, int]) -> str:
    return ", ".join(f"{count} x {what}" for what, count in sorted(errors.items())) or "-"


def _print_table(report: Report) -> None:
    header = (
        f"{'model':<17}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}  {'by status':<16}"
        f"{'server CPU':>11}{'other CPU':>10}"
    )
    print(header)
    print("-" * len(header))
    for run in report.runs:
        r = run.result
        if r is None:
            continue
        cpu = run.cpu
        print(
            f"{run.model:<17}{r.requests_per_s:>9.1f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}"
            f"{r.errors:>8}  {_by_status(run.window_errors):<16}"
            f"{_percent(cpu.server if cpu else None):>11}{_percent(cpu.other if cpu else None):>10}"
        )
    print(
        "(errors: non-2xx answers and lost connections in the measured window, a 504 among them;"
        " CPU in % of one core over warm-up and run: server = its process group, other = the"
        " rest of the machine)"
    )
    for run in report.runs:
        if run.warmup_errors:
            print(
                f"{run.model}: errors during the warm-up (not in the figures): "
                f"{_by_status(run.warmup_errors)}"
            )


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT met")


def _limits_text(limits: Sequence[int | None]) -> str:
    return ", ".join("?" if limit is None else str(limit) for limit in limits)


def _print_cases(report: Report, args: argparse.Namespace) -> None:
    for summary in report.cases:
        case = summary.case
        if summary.throughput_ratio is not None:
            print(
                f"{case}: throughput adaptive / single = {summary.throughput_ratio:.1f}x "
                f"(target >= {THROUGHPUT_TARGET:g}x: {_verdict(summary.ratio_met)})"
            )
        adaptive = summary.adaptive
        if adaptive is None or adaptive.result is None:
            continue
        print(
            f"{case}: adaptive p99 {adaptive.result.p99_ms:.1f} ms (target < {args.slo_ms:g} ms:"
            f" {_verdict(summary.adaptive_p99_met)})"
        )
        if adaptive.samples:
            print(
                f"{case}: batch limit over time (before the load, every {args.sample_interval:g}"
                f" s of {args.warmup:g} s warm-up + {args.duration:g} s measured, after it): "
                f"{_limits_text(adaptive.limits)}; final {adaptive.final_batch_limit}"
            )
            sizes = [s.last_batch_size for s in adaptive.samples]
            print(f"{case}: last batch size at the same moments: {_limits_text(sizes)}")
            expired = [s.expired for s in adaptive.samples if s.expired is not None]
            if len(expired) >= 2:
                print(
                    f"{case}: GET /models counted {expired[-1] - expired[0]} expired requests "
                    "(504) over warm-up and run"
                )
            if len(expired) >= 2 and expired[-1] > expired[0]:
                so_far = [count - expired[0] for count in expired]
                print(f"{case}: expired so far at the same moments: {_limits_text(so_far)}")


def _print_warnings(report: Report) -> None:
    noisiest = max((run.cpu.other or 0.0 for run in report.runs if run.cpu), default=0.0)
    if noisiest > NOISY_OTHER_CPU:
        print(
            f"WARNING: other processes used up to {100 * noisiest:.0f}% of a core during the "
            "runs; the machine was not quiet, so these figures are unreliable"
        )
    for warning in report.warnings:
        print(f"WARNING: {warning}")
    for failure in report.failures:
        print(f"FAILED: {failure}")


def _unmeasured(report: Report, cases: Sequence[str]) -> list[str]:
    """Why the figures are incomplete or the runs failed; empty when all is well."""
    problems = list(report.failures)
    measured = {(run.case, run.variant) for run in report.runs}
    for case in cases:
        for variant in VARIANTS:
            if (case, variant) not in measured:
                problems.append(f"{model_name(case, variant)} was not measured")
    for run in report.runs:
        if run.result is None or not run.result.requests or not math.isfinite(run.result.p99_ms):
            problems.append(f"{run.model}: no successful requests in the window")
        # A 504 is the objective doing its job (a request that cannot meet it is answered at
        # its deadline): printed, and the p99 judges it, but only other errors fail the run.
        broken = run.errors - run.window_errors.get("504", 0)
        if broken > ALLOWED_ERRORS:
            problems.append(
                f"{run.model}: {broken} errors other than 504 in the measured window "
                f"(> {ALLOWED_ERRORS})"
            )
        if run.variant == "adaptive" and run.final_batch_limit is None:
            problems.append(f"{run.model}: GET /models showed no batch_limit")
    return problems


def _json_report(report: Report) -> str:
    runs = []
    for run in report.runs:
        entry = asdict(run)
        entry["cpu"] = None if run.cpu is None else asdict(run.cpu)
        entry["final_batch_limit"] = run.final_batch_limit
        runs.append(entry)
    cases = []
    for c in report.cases:
        single = c.single.result if c.single else None
        adaptive = c.adaptive.result if c.adaptive else None
        cases.append(
            {
                "case": c.case,
                "single_requests_per_s": single.requests_per_s if single else None,
                "adaptive_requests_per_s": adaptive.requests_per_s if adaptive else None,
                "adaptive_p99_ms": adaptive.p99_ms if adaptive else None,
                "throughput_ratio": c.throughput_ratio,
                "throughput_target": THROUGHPUT_TARGET,
                "ratio_met": c.ratio_met,
                "adaptive_p99_met": c.adaptive_p99_met,
                "batch_limits": c.adaptive.limits if c.adaptive else [],
                "final_batch_limit": c.adaptive.final_batch_limit if c.adaptive else None,
            }
        )
    payload = {
        "args": report.args,
        "cases": cases,
        "runs": runs,
        "failures": report.failures,
        "warnings": report.warnings,
        "server_exit_code": report.server_exit_code,
    }
    return json.dumps(finite(payload))


def _parse_cases(text: str) -> list[str]:
    cases = [part.strip() for part in text.split(",") if part.strip()]
    if not cases or any(case not in CASES for case in cases):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(CASES)}, got {text!r}")
    return list(dict.fromkeys(cases))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--connections", type=int, default=64, help="closed-loop connections")
    parser.add_argument("--cases", type=_parse_cases, default=list(CASES), help="burn,matmul")
    parser.add_argument("--burn-ms", type=float, default=10.0, help="CPU ms per call")
    parser.add_argument("--per-input-ms", type=float, default=0.1, help="CPU ms per input")
    parser.add_argument("--matmul-dim", type=int, default=5120, help="D of the (D, D) matrix")
    parser.add_argument("--matmul-threads", type=int, default=1, help="BLAS threads per worker")
    parser.add_argument("--slo-ms", type=float, default=100.0, help="the adaptive objective")
    parser.add_argument("--max-batch-size", type=int, default=64, help="of the adaptive models")
    parser.add_argument("--max-delay-ms", type=float, default=2.0, help="of the adaptive models")
    parser.add_argument("--sample-interval", type=float, default=0.5, help="GET /models every")
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to ready")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    if min(args.connections, args.matmul_dim, args.matmul_threads, args.max_batch_size) < 1:
        parser.error(
            "--connections, --matmul-dim, --matmul-threads and --max-batch-size must be at least 1"
        )
    if not (args.duration > 0 and args.warmup >= 0 and args.sample_interval > 0):
        parser.error("need --duration > 0, --warmup >= 0 and --sample-interval > 0")
    if not (args.burn_ms > 0 and args.per_input_ms >= 0 and args.slo_ms > args.max_delay_ms >= 0):
        parser.error("need --burn-ms > 0, --per-input-ms >= 0 and --slo-ms > --max-delay-ms >= 0")

    report = Report(args={k: v for k, v in vars(args).items() if k != "json"})
    source = MODELS_SOURCE.format(
        burn_ms=args.burn_ms,
        per_input_ms=args.per_input_ms,
        dim=args.matmul_dim,
        threads=args.matmul_threads,
        seed=SEED,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        slo_ms=args.slo_ms,
    )
    with tempfile.TemporaryDirectory(prefix="ketch-bench-batching-") as directory:
        models_file = write_models(Path(directory), source)
        print("starting ketch ...", file=sys.stderr, flush=True)
        _measure(args, models_file, report)
    _summarise(report, args.slo_ms)

    print(
        f"{args.connections} connections, one worker per model; single: max_batch_size=1; "
        f"adaptive: max_batch_size={args.max_batch_size}, slo_ms={args.slo_ms:g}, "
        f"max_delay_ms={args.max_delay_ms:g}"
    )
    print(
        f"burn: {args.burn_ms:g} ms CPU per call + {args.per_input_ms:g} ms per input; matmul: "
        f"(n, {args.matmul_dim}) @ ({args.matmul_dim}, {args.matmul_dim}) float32, "
        f"{args.matmul_threads} BLAS thread(s) per worker"
    )
    _print_table(report)
    _print_cases(report, args)
    _print_warnings(report)
    problems = _unmeasured(report, args.cases)
    for problem in problems:
        if problem not in report.failures:
            print(f"FAILED: {problem}")
    if args.json:
        print(_json_report(report))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
