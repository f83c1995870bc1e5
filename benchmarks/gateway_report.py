"""The figures of bench_gateway.py's rounds, judged against their targets: printed, and as JSON.

Each round gives three figures (:data:`GOALS`): throughput and p99 of ketch over the baseline's
at the highest connection count, and the median latency ketch adds at the lowest. Their median
over the rounds is judged against its target; a missed target prints ``NOT met`` but leaves the
exit status alone, which only a server that could not be measured, or a run with errors or no
answers, makes non-zero.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gateway_run import Row, Target
from loadgen import LoadResult
from report import finite

THROUGHPUT_TARGET = 0.80
P99_RATIO_TARGET = 2.0
ADDED_P50_TARGET_MS = 0.30
#: CPU taken by unrelated processes during a run, in cores, above which figures are suspect.
NOISY_OTHER_CPU = 0.25


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


def print_report(targets: Sequence[Target], args: argparse.Namespace) -> int:
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


def gateways_target(count: int) -> str:
    """The target name of ``ketch serve --gateways COUNT`` (COUNT > 1; one is ``ketch``)."""
    return f"ketch-g{count}"


def print_gateways(targets: Sequence[Target], args: argparse.Namespace) -> None:
    """With ``--gateways``: each count's throughput at the highest connection count, and its
    ratio to one gateway's (``ketch``), round by round and the median."""
    counts = [n for n in args.gateways if n > 1]
    if not counts:
        return
    rows = [row for t in targets for row in t.rows]
    busy = max(args.connections)
    print()
    header = f"{'round':<8}{'1 gateway req/s':>18}" + "".join(
        f"{f'{n} gateways req/s':>20}{f'{n} / 1':>10}" for n in counts
    )
    print(header)
    print("-" * len(header))
    ratios: dict[int, list[float | None]] = {n: [] for n in counts}
    for number in range(1, args.rounds + 1):
        one = _find(rows, number, "ketch", busy)
        cells = f"{number:<8}{_rate(one):>18}"
        for n in counts:
            more = _find(rows, number, gateways_target(n), busy)
            ratio = _ratio(more.requests_per_s, one.requests_per_s) if more and one else None
            ratios[n].append(ratio)
            cells += f"{_rate(more):>20}{_times(ratio):>10}"
        print(cells)
    print("-" * len(header))
    medians = "".join(f"{'':>20}{_times(_median(ratios[n])):>10}" for n in counts)
    print(f"{'median':<8}{'':>18}{medians}")
    print(f"(at {busy} connections; the load generator and the gateways share the machine's cores)")


def _median(values: Sequence[float | None]) -> float | None:
    spread = Spread.of(values)
    return None if spread is None else spread.median


def _rate(result: LoadResult | None) -> str:
    return "n/a" if result is None else f"{result.requests_per_s:.1f}"


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"
