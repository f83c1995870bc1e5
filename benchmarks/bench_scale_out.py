"""How long a pool at zero takes to reach its full throughput under a step of load.

This writes a models file with one CPU-bound model to a temporary directory::

    @ketch.model(max_batch_size=1, max_replicas=2, target_inflight=1, min_replicas=0,
                 idle_timeout_s=60)
    def burn(xs): ...  # busy-loops on time.thread_time() for 20 ms per input

serves it with ``ketch serve``, checks ``GET /models`` says ``zero``, and then applies a step
of load: ``--connections`` (default 8) closed-loop keep-alive connections that all start
sending at the same moment, for ``--duration`` seconds (default 8). Every response's
completion time is kept, and throughput is counted in ``--window`` windows (default 250 ms)
from the client's side. It reports:

- **steady state**: the throughput over the last ``--steady`` seconds (default 3);
- **time to 90%**: the end of the first window whose throughput reached 90% of the steady
  state (so it is exact to one window);
- the time of the first answer, the moments each worker joined (from the server's
  ``ketch: model burn:1 ready: worker pid ...`` lines), and the replicas ``GET /models``
  reports at the end.

The load uses ``loadgen``'s connection code, keeping each completion's time instead of only
the latencies of a fixed window. Two workers burning 20 ms each can at best answer 100 req/s;
on a 2-core machine the gateway and the load generator share those cores, so expect less.

Run from anywhere: ``python benchmarks/bench_scale_out.py [--json]``.
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
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ketch_server import WORKER_LOST, WORKER_READY, KetchServer, write_models
from loadgen import (
    LoadSpec,
    _build_target,
    _Connection,
    _Run,
    _run_loop,
    _Target,
    connect_all,
)
from procstat import CpuSample, CpuShares
from report import finite
from server_process import ServerError

MODEL = "burn"
BODY = b'{"input": 1}'
MODELS_SOURCE = """
    import time

    import ketch

    BURN_S = {burn_ms!r} / 1000


    @ketch.model(
        max_batch_size=1, max_replicas=2, target_inflight=1, min_replicas=0, idle_timeout_s=60
    )
    def burn(xs):
        # CPU time of this thread, not a sleep: a worker that sleeps would scale for free.
        for _ in xs:
            end = time.thread_time() + BURN_S
            while time.thread_time() < end:
                pass
        return xs
"""
MAX_REPLICAS = 2
#: Throughput, as a share of the steady state, that counts as "full".
FULL_SHARE = 0.90
#: How often the line watcher looks at its stop flag while no line comes.
WATCH_POLL_S = 0.05
#: CPU taken by unrelated processes during the run, in cores, above which figures are suspect.
NOISY_OTHER_CPU = 0.25


class BenchmarkError(Exception):
    """A figure could not be measured; the message says why."""


class _TimedRun(_Run):
    """loadgen's run state, keeping when each response completed rather than its latency."""

    def __init__(self, target: _Target) -> None:
        super().__init__(target)
        self.answered_ns = array("q")
        self.failed_ns = array("q")

    def record(self, status: int, latency_ns: int, now_ns: int) -> None:
        (self.answered_ns if 200 <= status < 300 else self.failed_ns).append(now_ns)

    def record_error(self, now_ns: int) -> None:
        self.failed_ns.append(now_ns)


class LineWatcher:
    """Reads the server's stdout in a thread, stamping each line with ``perf_counter_ns``
    (the load generator's clock) as it arrives."""

    def __init__(self, server: KetchServer) -> None:
        self._server = server
        self._stop = threading.Event()
        self.lines: list[tuple[int, str]] = []
        self.ended: str | None = None
        self._thread = threading.Thread(target=self._watch, name="ketch-lines", daemon=True)

    def __enter__(self) -> LineWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                line = self._server.next_line(WATCH_POLL_S)
            except ServerError as exc:
                self.ended = str(exc)
                return
            if line is not None:
                self.lines.append((time.perf_counter_ns(), line))


@dataclass(frozen=True)
class Window:
    start_s: float
    end_s: float
    requests_per_s: float
    #: Workers of the model that had joined, and not left, by the end of the window.
    workers: int


@dataclass
class Report:
    connections: int
    duration_s: float
    window_s: float
    steady_s: float
    burn_ms: float
    windows: list[Window] = field(default_factory=list)
    steady_requests_per_s: float = math.nan
    time_to_full_s: float | None = None
    first_answer_s: float | None = None
    workers_joined_s: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    #: From ``GET /models`` once the load has stopped.
    replicas_at_end: dict[str, int] = field(default_factory=dict)
    cold_starts: int | None = None
    cpu: CpuShares | None = None
    server_exit_code: int | None = None
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


async def _step_load(target: _Target, connections: int, duration_s: float) -> tuple[int, _TimedRun]:
    """Open every connection, then start them all at once; return the start time and tallies."""
    run = _TimedRun(target)
    run.connections = [_Connection(run) for _ in range(connections)]
    try:
        try:
            await connect_all(run.connections, target)
        except ConnectionError as exc:
            raise BenchmarkError(str(exc)) from exc
        started_ns = time.perf_counter_ns()
        run.sending = True
        for conn in run.connections:
            conn.send()
        await asyncio.sleep(duration_s)  # the length of the run, not a wait for a peer
    finally:
        run.sending = False
        for task in run.reconnects:
            task.cancel()
        for conn in run.connections:
            conn.close()
    return started_ns, run


def _worker_events(lines: Sequence[tuple[int, str]], started_ns: int) -> list[tuple[float, int]]:
    """(seconds since the step, +1 joined / -1 left) for the model's workers."""
    events: list[tuple[float, int]] = []
    for at_ns, line in lines:
        for pattern, change in ((WORKER_READY, 1), (WORKER_LOST, -1)):
            match = pattern.match(line)
            if match and match["label"].split(":")[0] == MODEL:
                events.append(((at_ns - started_ns) / 1e9, change))
    return events


def _analyse(
    report: Report, started_ns: int, run: _TimedRun, lines: Sequence[tuple[int, str]]
) -> None:
    answered = sorted((at_ns - started_ns) / 1e9 for at_ns in run.answered_ns)
    answered = [t for t in answered if t < report.duration_s]
    report.requests = len(answered)
    report.errors = len(run.failed_ns)
    report.first_answer_s = answered[0] if answered else None
    events = _worker_events(lines, started_ns)
    report.workers_joined_s = [t for t, change in events if change > 0]

    count = round(report.duration_s / report.window_s)
    tallies = [0] * count
    for t in answered:
        tallies[min(count - 1, int(t / report.window_s))] += 1
    for i, tally in enumerate(tallies):
        end_s = (i + 1) * report.window_s
        workers = sum(change for t, change in events if t < end_s)
        report.windows.append(Window(i * report.window_s, end_s, tally / report.window_s, workers))

    steady_from = report.duration_s - report.steady_s
    report.steady_requests_per_s = sum(1 for t in answered if t >= steady_from) / report.steady_s
    if report.steady_requests_per_s > 0:
        full = FULL_SHARE * report.steady_requests_per_s
        report.time_to_full_s = next(
            (w.end_s for w in report.windows if w.requests_per_s >= full), None
        )


def _measure(args: argparse.Namespace, models_file: Path, report: Report) -> None:
    server = KetchServer(models_file)
    try:
        with server:
            base_url = server.start(args.startup_timeout)
            status = server.model_status(MODEL)
            if status.get("state") != "zero":
                raise BenchmarkError(f"{MODEL} should start at zero, GET /models says {status}")
            target = _build_target(LoadSpec(url=f"{base_url}/models/{MODEL}/predict", body=BODY))
            print(
                f"step of {args.connections} connections for {args.duration:g} s ...",
                file=sys.stderr,
                flush=True,
            )
            before = CpuSample.take(server.pgid)
            with LineWatcher(server) as watcher:
                started_ns, run = _run_loop(_step_load(target, args.connections, args.duration))
            report.cpu = CpuShares.between(before, CpuSample.take(server.pgid))
            if watcher.ended is not None:
                raise BenchmarkError(f"the server stopped during the run: {watcher.ended}")
            _analyse(report, started_ns, run, watcher.lines)
            status = server.model_status(MODEL)
            report.replicas_at_end = dict(status.get("replicas", {}))
            report.cold_starts = status.get("cold_starts")
    except (BenchmarkError, ServerError, OSError) as exc:
        report.failures.append(str(exc))
    report.server_exit_code = server.exit_code
    report.warnings.extend(f"ketch {warning}" for warning in server.stop_warnings)


def _print_windows(report: Report) -> None:
    # Up to a second past the moment throughput was full, and at least two seconds.
    shown_until = max(2.0, (report.time_to_full_s or report.duration_s) + 1.0)
    print(f"{'window s':<14}{'req/s':>8}{'workers':>9}")
    print("-" * 31)
    for window in report.windows:
        if window.start_s >= shown_until:
            print(f"... ({len(report.windows)} windows in all; --json lists every one)")
            break
        print(
            f"{window.start_s:5.2f}-{window.end_s:<8.2f}{window.requests_per_s:>8.1f}"
            f"{window.workers:>9}"
        )


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.0f} ms"


def _print_figures(report: Report) -> None:
    ideal = MAX_REPLICAS * 1000 / report.burn_ms
    joined = ", ".join(_ms(t) for t in report.workers_joined_s) or "none"
    print(
        f"first answer after {_ms(report.first_answer_s)}; workers joined at {joined} "
        "(since the step)"
    )
    replicas = report.replicas_at_end
    print(
        f"steady state (last {report.steady_s:g} s): {report.steady_requests_per_s:.1f} req/s "
        f"({report.steady_requests_per_s / ideal:.0%} of the ideal {ideal:.0f} req/s of "
        f"{MAX_REPLICAS} workers x {report.burn_ms:g} ms); GET /models at the end: "
        f"{replicas.get('ready', 'n/a')} ready, {replicas.get('starting', 'n/a')} starting, "
        f"{report.cold_starts} cold start(s)"
    )
    if report.time_to_full_s is not None:
        print(
            f"time to {FULL_SHARE:.0%} of steady state: {report.time_to_full_s:.2f} s (end of the "
            f"first {1000 * report.window_s:.0f} ms window at or above "
            f"{FULL_SHARE * report.steady_requests_per_s:.1f} req/s)"
        )
    else:
        print(f"time to {FULL_SHARE:.0%} of steady state: not reached")
    print(f"requests answered: {report.requests}, errors: {report.errors}")
    if report.cpu is not None:
        shares = (report.cpu.server, report.cpu.client, report.cpu.other)
        server, client, other = ("n/a" if s is None else f"{100 * s:.0f}%" for s in shares)
        print(f"CPU over the run (% of one core): server {server}, client {client}, other {other}")


def _print_warnings(report: Report) -> None:
    if report.cpu is not None and (report.cpu.other or 0.0) > NOISY_OTHER_CPU:
        print(
            f"WARNING: other processes used {100 * (report.cpu.other or 0.0):.0f}% of a core "
            "during the run; the machine was not quiet, so these figures are unreliable"
        )
    if report.replicas_at_end and report.replicas_at_end.get("ready") != MAX_REPLICAS:
        print(f"WARNING: the pool ended with {report.replicas_at_end}, not {MAX_REPLICAS} ready")
    if report.cold_starts not in (None, 1):
        print(f"WARNING: {report.cold_starts} cold starts; a step from zero should make one")
    for warning in report.warnings:
        print(f"WARNING: {warning}")
    for failure in report.failures:
        print(f"FAILED: {failure}")


def _json_report(report: Report) -> str:
    payload = asdict(report)
    payload["cpu"] = None if report.cpu is None else asdict(report.cpu)
    return json.dumps(finite(payload))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=8, help="closed-loop connections")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load")
    parser.add_argument("--window", type=float, default=0.25, help="seconds per sample")
    parser.add_argument("--steady", type=float, default=3.0, help="last seconds = steady state")
    parser.add_argument("--burn-ms", type=float, default=20.0, help="CPU ms per input")
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to ready")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    if args.connections < 1:
        parser.error(f"--connections must be at least 1, got {args.connections}")
    if not 0 < args.window <= args.steady < args.duration:
        parser.error(
            "need 0 < --window <= --steady < --duration, got "
            f"{args.window:g}, {args.steady:g}, {args.duration:g}"
        )
    if not args.burn_ms > 0:
        parser.error(f"--burn-ms must be > 0, got {args.burn_ms:g}")

    report = Report(args.connections, args.duration, args.window, args.steady, args.burn_ms)
    with tempfile.TemporaryDirectory(prefix="ketch-bench-scale-") as directory:
        models_file = write_models(Path(directory), MODELS_SOURCE.format(burn_ms=args.burn_ms))
        print("starting ketch ...", file=sys.stderr, flush=True)
        _measure(args, models_file, report)

    print(
        f"step load: {report.connections} connections on {MODEL!r} ({report.burn_ms:g} ms CPU "
        f"per input, max_batch_size=1, max_replicas={MAX_REPLICAS}, target_inflight=1) from "
        f"zero, {report.duration_s:g} s"
    )
    if report.windows:
        _print_windows(report)
        _print_figures(report)
    _print_warnings(report)
    if args.json:
        print(_json_report(report))
    measured = report.requests and report.time_to_full_s is not None
    return 1 if report.failures or report.errors or not measured else 0


if __name__ == "__main__":
    sys.exit(main())
