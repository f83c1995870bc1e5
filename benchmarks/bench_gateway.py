"""What ketch's gateway costs, against a bare Starlette app on the same Hypercorn settings.

This starts ``ketch serve examples/quickstart.py`` and ``benchmarks/baseline_app.py``, each in
its own process group, waits (with a deadline) for each one's ``ketch: ready`` line, and keeps
both up for the whole run. Then it runs ``--rounds`` interleaved rounds (default 5): ketch,
baseline, ketch, baseline, ... In a server's turn it alone receives load while the other sits
idle: one request by hand (which also waits out a worker's cold start), then ``loadgen`` at
each connection count. A single run of each swings by a third between runs on a shared
machine; alternating spreads slow changes in the machine's speed over both servers, instead of
handing them all to whichever ran second, and the median of the rounds shrugs off a bad one.

Each round gives three figures; the run prints them round by round, their median and their
range (min-max), and judges each median against its target:

- throughput, ketch / baseline, at the highest connection count (default 64): at least 0.80;
- p99 latency, ketch / baseline, at the highest connection count: at most 2x;
- added median latency, ketch p50 - baseline p50, at the lowest count (default 1): at most
  0.30 ms.

A missed target prints ``NOT met`` and leaves the exit status alone: that is non-zero when a
server could not be measured, or any run saw errors or no answers. Both servers are stopped
(SIGINT, then their process group killed) however the run ends: normally, on an exception, on
Ctrl-C, SIGTERM or SIGHUP.

Run from anywhere: ``python benchmarks/bench_gateway.py --duration 5 --rounds 5 [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import signal
import statistics
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeAlias

from loadgen import LoadResult, LoadSpec, run_load
from procstat import CpuSample, CpuShares
from report import at_least, finite
from server_process import ServerError, ServerProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
PREDICT_PATH = "/models/double/predict"
THROUGHPUT_TARGET = 0.80
P99_RATIO_TARGET = 2.0
ADDED_P50_TARGET_MS = 0.30
#: The first request may wait for ketch to start a worker (models scale to zero when idle).
PROBE_TIMEOUT_S = 60.0
#: CPU taken by unrelated processes during a run, in cores, above which figures are suspect.
NOISY_OTHER_CPU = 0.25
#: Signals that end a run early; each must still stop both servers.
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: What signal.signal() accepts and returns (None: a handler not installed from Python).
SignalHandler: TypeAlias = Callable[[int, FrameType | None], Any] | int | None


class BenchmarkError(Exception):
    """A target could not be measured; the message says why."""


#: What makes one server unmeasurable (it is then left out of the remaining rounds), as
#: opposed to a bug in this script, which should end the run with its traceback.
MEASUREMENT_ERRORS = (BenchmarkError, ServerError, ConnectionError, RuntimeError, TimeoutError)


@dataclass(frozen=True)
class Row:
    round: int
    target: str
    result: LoadResult
    #: CPU over warm-up and window, in cores: the server's process group (gateway and
    #: workers), the load generator, and everything else on the machine.
    cpu: CpuShares


@dataclass
class Target:
    """A server under test, kept up for the whole run, and what was measured on it."""

    name: str
    command: Callable[[], list[str]]
    server: ServerProcess | None = None
    #: The predict URL, once the server is ready; None again if it fails.
    url: str | None = None
    rows: list[Row] = field(default_factory=list)
    reply_keys: list[str] = field(default_factory=list)
    exit_code: int | None = None
    failure: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Goal:
    """A figure computed in every round, and the target its median is judged against."""

    #: Its key in RoundFigures.values and in the JSON output.
    figure: str
    #: Its name in sentences and in the per-round table; ``{busy}`` and ``{idle}`` stand for
    #: the highest and the lowest connection count.
    label: str
    column: str
    limit: float
    #: True: the median must be at least the limit; False: at most.
    at_least: bool
    unit: str
    digits: int

    def number(self, value: float | None) -> str:
        return "n/a" if value is None else f"{value:.{self.digits}f}"

    def with_unit(self, value: float) -> str:
        return f"{self.number(value)}{self.unit}"

    def target_text(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.with_unit(self.limit)}"

    def met(self, value: float) -> bool:
        return value >= self.limit if self.at_least else value <= self.limit


GOALS = (
    Goal(
        "throughput_ratio",
        "throughput ketch/baseline at {busy} connections",
        "req/s ratio @{busy}",
        THROUGHPUT_TARGET,
        at_least=True,
        unit="",
        digits=2,
    ),
    Goal(
        "p99_ratio",
        "p99 ketch/baseline at {busy} connections",
        "p99 ratio @{busy}",
        P99_RATIO_TARGET,
        at_least=False,
        unit="x",
        digits=2,
    ),
    Goal(
        "added_p50_ms",
        "added median latency ketch - baseline at {idle} connection(s)",
        "added p50 ms @{idle}",
        ADDED_P50_TARGET_MS,
        at_least=False,
        unit=" ms",
        digits=3,
    ),
)


@dataclass(frozen=True)
class RoundFigures:
    number: int
    #: Goal.figure -> its value in this round; None where a server had nothing to compare.
    values: dict[str, float | None]
    #: The most CPU unrelated processes took during any run of the round, in cores.
    other_cpu: float | None


@dataclass(frozen=True)
class Spread:
    """The median and range of one figure over the rounds that measured it."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread | None:
        measured = [value for value in values if value is not None]
        if not measured:
            return None
        return cls(statistics.median(measured), min(measured), max(measured), len(measured))


@dataclass(frozen=True)
class Summary:
    busy: int
    idle: int
    rounds: list[RoundFigures]
    spreads: dict[str, Spread | None]


def _probe(url: str, body: bytes) -> dict[str, Any]:
    """Send one request and return its JSON reply, so a broken route fails loudly up front."""
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise BenchmarkError(f"POST {url} answered {exc.code}: {detail}") from exc
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"POST {url} failed: {exc}") from exc
    if not isinstance(payload, dict):
        raise BenchmarkError(f"POST {url} answered {payload!r}, not a JSON object")
    return payload


def _ketch_command() -> list[str]:
    # Prefer the console script installed beside this interpreter, so both targets run on the
    # same Python; fall back to whatever `ketch` is on PATH.
    beside = Path(sys.executable).with_name("ketch")
    found = str(beside) if beside.exists() else shutil.which("ketch")
    if found is None:
        raise BenchmarkError("no `ketch` command found; install ketch with `pip install -e .`")
    return [found, "serve", "examples/quickstart.py", "--host", "127.0.0.1", "--port", "0"]


def _baseline_command() -> list[str]:
    script = Path(__file__).with_name("baseline_app.py")
    return [sys.executable, str(script), "--host", "127.0.0.1", "--port", "0"]


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _restore_handlers(saved: dict[signal.Signals, SignalHandler]) -> None:
    for signum, handler in saved.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def _ending_signals_unwind() -> Iterator[None]:
    """Make SIGTERM and SIGHUP raise SystemExit inside the block, as Ctrl-C raises
    KeyboardInterrupt: by default they end Python without running the code that stops the
    servers. The handlers of all ending signals are restored on the way out."""
    saved = {signum: signal.getsignal(signum) for signum in ENDING_SIGNALS}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    try:
        yield
    finally:
        _restore_handlers(saved)


def _ignore_ending_signals() -> dict[signal.Signals, SignalHandler]:
    """Ignore Ctrl-C and termination, and return the handlers this replaced.

    Done while a server is being stopped: a signal that broke off its stop half-way would leave
    its process group running. Each stop has deadlines of its own (SIGINT, then SIGKILL of the
    group), so ignoring the signals cannot hang the run.
    """
    return {signum: signal.signal(signum, signal.SIG_IGN) for signum in ENDING_SIGNALS}


def _stop_early(server: ServerProcess) -> None:
    saved = _ignore_ending_signals()
    try:
        server.stop()  # idempotent: the exit stack's stop at the end then does nothing
    finally:
        _restore_handlers(saved)


def _announce_final_stops() -> None:
    # Not restored here: main's _ending_signals_unwind does that once both servers are stopped.
    _ignore_ending_signals()
    print("stopping the servers ...", file=sys.stderr, flush=True)


def _launch(target: Target, servers: contextlib.ExitStack) -> None:
    """Start the target's server; ``servers`` stops it however the run ends."""
    print(f"starting {target.name} ...", file=sys.stderr, flush=True)
    try:
        command = target.command()
        target.server = servers.enter_context(ServerProcess(target.name, command, REPO_ROOT))
    except (BenchmarkError, ServerError) as exc:
        target.failure = str(exc)


def _give_up(target: Target, reason: str) -> None:
    """Leave the target out of the remaining rounds, and stop its server now rather than at
    the end, so that a broken server does not run beside the other one's load."""
    target.failure, target.url = reason, None
    if target.server is not None:
        _stop_early(target.server)


def _await_ready(target: Target, timeout_s: float) -> None:
    if target.server is None:
        return
    try:
        target.url = target.server.wait_ready(timeout_s) + PREDICT_PATH
    except ServerError as exc:
        _give_up(target, str(exc))


def _measure_load(
    server: ServerProcess, url: str, connections: int, number: int, args: argparse.Namespace
) -> Row:
    spec = LoadSpec(
        url=url,
        body=args.body.encode(),
        connections=connections,
        duration_s=args.duration,
        warmup_s=args.warmup,
        processes=args.processes,
    )
    before = CpuSample.take(server.pgid)
    result = run_load(spec)
    cpu = CpuShares.between(before, CpuSample.take(server.pgid))
    return Row(number, server.name, result, cpu)


def _run_turn(target: Target, number: int, args: argparse.Namespace) -> None:
    """Give the target its turn of round ``number``: a probe, then the load at each count."""
    server, url = target.server, target.url
    if server is None or url is None:
        return
    try:
        # Every round, not only the first: ketch's worker may have scaled to zero while the
        # other server had the load, and the probe, not a measured warm-up, should wait for it.
        target.reply_keys = sorted(_probe(url, args.body.encode()))
        for connections in args.connections:
            print(
                f"  round {number}/{args.rounds}, {target.name}: {connections} connections ...",
                file=sys.stderr,
                flush=True,
            )
            target.rows.append(_measure_load(server, url, connections, number, args))
    except MEASUREMENT_ERRORS as exc:
        _give_up(target, f"round {number}: {exc}")


def _run(targets: Sequence[Target], args: argparse.Namespace) -> None:
    """Start every server, run the rounds, and stop every server however this ends."""
    with contextlib.ExitStack() as servers:
        for target in targets:
            _launch(target, servers)
        # Registered after the servers, so it runs before their stops on the way out.
        servers.callback(_announce_final_stops)
        # Both were started above, so they come up side by side; only now wait for them.
        for target in targets:
            _await_ready(target, args.startup_timeout)
        for number in range(1, args.rounds + 1):
            for target in targets:
                _run_turn(target, number, args)


def _record_stops(targets: Sequence[Target]) -> None:
    for target in targets:
        if target.server is not None:
            target.exit_code = target.server.exit_code
            target.warnings = target.server.stop_warnings


def _find(rows: Sequence[Row], number: int, target: str, connections: int) -> LoadResult | None:
    for row in rows:
        if (row.round, row.target, row.result.connections) == (number, target, connections):
            return row.result
    return None


def _ratio(numerator: float, denominator: float) -> float | None:
    """None where either figure was not measured (NaN: no answers) or there is nothing to
    divide by."""
    if math.isfinite(numerator) and math.isfinite(denominator) and denominator > 0:
        return numerator / denominator
    return None


def _difference(minuend: float, subtrahend: float) -> float | None:
    if math.isfinite(minuend) and math.isfinite(subtrahend):
        return minuend - subtrahend
    return None


def _round_figures(rows: Sequence[Row], number: int, busy: int, idle: int) -> RoundFigures:
    values: dict[str, float | None] = {goal.figure: None for goal in GOALS}
    ketch, baseline = _find(rows, number, "ketch", busy), _find(rows, number, "baseline", busy)
    if ketch is not None and baseline is not None:
        values["throughput_ratio"] = _ratio(ketch.requests_per_s, baseline.requests_per_s)
        values["p99_ratio"] = _ratio(ketch.p99_ms, baseline.p99_ms)
    ketch, baseline = _find(rows, number, "ketch", idle), _find(rows, number, "baseline", idle)
    if ketch is not None and baseline is not None:
        values["added_p50_ms"] = _difference(ketch.p50_ms, baseline.p50_ms)
    others = [row.cpu.other for row in rows if row.round == number and row.cpu.other is not None]
    return RoundFigures(number, values, max(others, default=None))


def _summarize(rows: Sequence[Row], args: argparse.Namespace) -> Summary:
    busy, idle = max(args.connections), min(args.connections)
    rounds = [_round_figures(rows, n, busy, idle) for n in range(1, args.rounds + 1)]
    spreads = {goal.figure: Spread.of([r.values[goal.figure] for r in rounds]) for goal in GOALS}
    return Summary(busy, idle, rounds, spreads)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _print_runs(rows: Sequence[Row]) -> None:
    header = (
        f"{'round':<7}{'target':<10}{'connections':>12}{'req/s':>11}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'errors':>8}{'client CPU':>12}{'server CPU':>12}{'other CPU':>11}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        r = row.result
        print(
            f"{row.round:<7}{row.target:<10}{r.connections:>12}{r.requests_per_s:>11.1f}"
            f"{r.p50_ms:>10.3f}{r.p99_ms:>10.3f}{r.errors:>8}{_percent(row.cpu.client):>12}"
            f"{_percent(row.cpu.server):>12}{_percent(row.cpu.other):>11}"
        )
    print(
        "(CPU in % of one core over warm-up and run: client = load generator, server = its"
        " process group, other = the rest of the machine)"
    )


def _range_text(goal: Goal, spread: Spread | None) -> str:
    if spread is None:
        return "n/a"
    return f"{goal.number(spread.low)}-{goal.number(spread.high)}"


def _print_rounds(summary: Summary) -> None:
    columns = [goal.column.format(busy=summary.busy, idle=summary.idle) for goal in GOALS]
    header = f"{'round':<8}" + "".join(f"{c:>20}" for c in columns) + f"{'max other CPU':>15}"
    print(header)
    print("-" * len(header))
    for figures in summary.rounds:
        cells = "".join(f"{goal.number(figures.values[goal.figure]):>20}" for goal in GOALS)
        print(f"{figures.number:<8}{cells}{_percent(figures.other_cpu):>15}")
    print("-" * len(header))
    spreads = [summary.spreads[goal.figure] for goal in GOALS]
    medians = [goal.number(s.median if s else None) for goal, s in zip(GOALS, spreads, strict=True)]
    ranges = [_range_text(goal, s) for goal, s in zip(GOALS, spreads, strict=True)]
    print(f"{'median':<8}" + "".join(f"{m:>20}" for m in medians))
    print(f"{'range':<8}" + "".join(f"{r:>20}" for r in ranges))


def _verdict(goal: Goal, spread: Spread | None) -> bool | None:
    return None if spread is None else goal.met(spread.median)


def _verdict_text(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT met")


def _print_goals(summary: Summary) -> None:
    for goal in GOALS:
        spread = summary.spreads[goal.figure]
        label = goal.label.format(busy=summary.busy, idle=summary.idle)
        if spread is None:
            measured = "not measured"
        else:
            measured = (
                f"median {goal.with_unit(spread.median)} (range {_range_text(goal, spread)} "
                f"over {spread.rounds} of {len(summary.rounds)} rounds)"
            )
        verdict = _verdict_text(_verdict(goal, spread))
        print(f"{label}: {measured}; target {goal.target_text()}: {verdict}")


def _print_warnings(targets: Sequence[Target], summary: Summary) -> None:
    noisy = [f for f in summary.rounds if (f.other_cpu or 0.0) > NOISY_OTHER_CPU]
    if noisy:
        noisiest = max(f.other_cpu or 0.0 for f in noisy)
        print(
            f"WARNING: other processes used up to {100 * noisiest:.0f}% of a core during the "
            f"runs (rounds {', '.join(str(f.number) for f in noisy)}); the machine was not "
            "quiet, so these figures are unreliable"
        )
    shapes = {tuple(t.reply_keys) for t in targets if t.reply_keys}
    if len(shapes) > 1:
        print("WARNING: the targets answer with different JSON keys:", sorted(shapes))
    for target in targets:
        for warning in target.warnings:
            print(f"WARNING: {target.name} {warning}")
        if target.failure:
            print(f"FAILED: {target.name}: {target.failure}")


def _json_goals(summary: Summary) -> dict[str, Any]:
    goals: dict[str, Any] = {}
    for goal in GOALS:
        spread = summary.spreads[goal.figure]
        goals[goal.figure] = {
            "median": spread.median if spread else None,
            "min": spread.low if spread else None,
            "max": spread.high if spread else None,
            "rounds_measured": spread.rounds if spread else 0,
            "target": goal.limit,
            "target_is_minimum": goal.at_least,
            "met": _verdict(goal, spread),
        }
    return goals


def _json_report(
    args: argparse.Namespace, targets: Sequence[Target], rows: Sequence[Row], summary: Summary
) -> str:
    results = [
        {
            "round": row.round,
            "target": row.target,
            **asdict(row.result),
            "server_cpu_cores": row.cpu.server,
            "other_cpu_cores": row.cpu.other,
        }
        for row in rows
    ]
    rounds = [
        {"round": f.number, **f.values, "max_other_cpu_cores": f.other_cpu} for f in summary.rounds
    ]
    # The same keys as when there was a single run of each, now holding the medians.
    ratios = {
        "busy_connections": summary.busy,
        "idle_connections": summary.idle,
        **{figure: s.median if s else None for figure, s in summary.spreads.items()},
    }
    payload = {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "round_count": args.rounds,
        "results": results,
        "rounds": rounds,
        "ratios": ratios,
        "goals": _json_goals(summary),
        "targets": {
            t.name: {"exit_code": t.exit_code, "failure": t.failure, "warnings": t.warnings}
            for t in targets
        },
    }
    return json.dumps(finite(payload))


def _exit_status(targets: Sequence[Target], rows: Sequence[Row]) -> int:
    # A missed target is a finding, not a failure: only a server that could not be measured,
    # or a run with errors or without answers, makes the run fail.
    failed = any(t.failure for t in targets) or any(
        row.result.errors or not row.result.requests for row in rows
    )
    return 1 if failed else 0


def _report(targets: Sequence[Target], args: argparse.Namespace) -> int:
    # Round by round, ketch before the baseline (a stable sort keeps the targets' order).
    rows = sorted((row for t in targets for row in t.rows), key=lambda row: row.round)
    summary = _summarize(rows, args)
    _print_runs(rows)
    print()
    _print_rounds(summary)
    print()
    _print_goals(summary)
    _print_warnings(targets, summary)
    if args.json:
        print(_json_report(args, targets, rows, summary))
    return _exit_status(targets, rows)


def _parse_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 64,1, got {text!r}")
    return counts


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--connections", type=_parse_counts, default=[64, 1], help="e.g. 64,1")
    parser.add_argument(
        "--rounds", type=at_least(1), default=5, help="interleaved rounds: ketch, baseline, ..."
    )
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--body", default='{"input": 21}', help="request body")
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to ready")
    parser.add_argument("--json", action="store_true", help="also print results as JSON")
    args = parser.parse_args(argv)
    try:
        # Checked before any server starts, by the same rules the load generator applies.
        LoadSpec(
            url="http://127.0.0.1/",
            body=b"",
            duration_s=args.duration,
            warmup_s=args.warmup,
            processes=args.processes,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _announce(args: argparse.Namespace) -> None:
    runs = 2 * args.rounds * len(args.connections)
    print(
        f"{args.rounds} rounds, {runs} runs of {args.warmup:g} + {args.duration:g} s: "
        f"about {runs * (args.warmup + args.duration):.0f} s of load",
        file=sys.stderr,
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    targets = [Target("ketch", _ketch_command), Target("baseline", _baseline_command)]
    _announce(args)
    try:
        with _ending_signals_unwind():
            _run(targets, args)
    except KeyboardInterrupt:
        print("interrupted; both servers were stopped", file=sys.stderr)
        return 130
    _record_stops(targets)
    return _report(targets, args)


if __name__ == "__main__":
    sys.exit(main())
