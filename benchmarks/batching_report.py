"""What bench_batching.py measured, per model and per case: judged, printed, and as JSON.

A :class:`RunReport` per model (req/s, p50, p99, errors by status, CPU, the ``GET /models``
readings), a :class:`CaseReport` per case (throughput adaptive / single against
:data:`THROUGHPUT_TARGET`, the adaptive p99 against ``slo_ms``), and what makes the exit status
non-zero (:func:`unmeasured`): a missed target only prints ``NOT met``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from batching_models import VARIANTS, model_name
from loadgen import LoadResult
from procstat import CpuShares
from report import finite

#: Adaptive batching should answer at least this many times the requests of batch size 1.
THROUGHPUT_TARGET = 8.0
#: Errors a run's measured window may have before the exit code says the run failed. Errors
#: in the warm-up are printed, not failed on: an adaptive worker starts at a batch size of 1,
#: and a burst of 64 requests can outwait its first few batches (a 504 each).
ALLOWED_ERRORS = 5
#: CPU taken by unrelated processes during a run, in cores, above which figures are suspect.
NOISY_OTHER_CPU = 0.25


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


def summarise(report: Report, slo_ms: float) -> None:
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


def print_table(report: Report) -> None:
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


def print_cases(report: Report, args: argparse.Namespace) -> None:
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


def print_warnings(report: Report) -> None:
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


def unmeasured(report: Report, cases: Sequence[str]) -> list[str]:
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


def json_report(report: Report) -> str:
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
