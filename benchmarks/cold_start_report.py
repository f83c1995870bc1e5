"""What bench_cold_start.py measured: its figures against the target, printed, and as JSON.

The :class:`Report` of the trivial model's cycles and baselines holds the :class:`PreloadReport`
of the preload case; :func:`print_report` prints both and returns the exit status, non-zero
when a figure could not be measured (a :class:`BenchmarkError`, recorded as a failure, says
why). A missed target only prints ``MISSES``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cold_start_models import HEAVY, HEAVY_IMPORTS, HEAVY_MODELS, HEAVY_PRELOADED
from procstat import CpuShares
from report import finite, percentile

COLD_START_TARGET_MS = 50.0
COLD_START_STRETCH_MS = 25.0
#: CPU taken by unrelated processes during the cycles, in cores, above which figures are suspect.
NOISY_OTHER_CPU = 0.25


class BenchmarkError(Exception):
    """A figure could not be measured; the message says why."""


@dataclass
class PreloadReport:
    """The preload case: cold starts of ``heavy`` and ``heavy_preloaded``, by model."""

    first_cold_ms: dict[str, float] = field(default_factory=dict)
    cold_ms: dict[str, list[float]] = field(
        default_factory=lambda: {model: [] for model in HEAVY_MODELS}
    )
    #: The template of ``heavy_preloaded`` as ``GET /models`` reports it after the cycles.
    template_pid: int | None = None
    template_rss_mb: int | None = None
    #: The heavy imports alone, timed in fresh interpreters after the server has stopped.
    import_ms: list[float] = field(default_factory=list)
    cold_starts_counted: dict[str, int | None] = field(default_factory=dict)
    cpu: CpuShares | None = None
    server_exit_code: int | None = None


@dataclass
class Report:
    cycles: int
    idle_timeout_s: float
    first_cold_ms: float | None = None
    cold_ms: list[float] = field(default_factory=list)
    warm_ms: list[float] = field(default_factory=list)
    fresh_ms: list[float] = field(default_factory=list)
    #: ``cold_starts`` from ``GET /models`` at the end: one per timed cold request, plus one.
    cold_starts_counted: int | None = None
    #: CPU over the cycles, in cores: the server's group, this script, everything else.
    cpu: CpuShares | None = None
    server_exit_code: int | None = None
    preload: PreloadReport = field(default_factory=PreloadReport)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _figures(report: Report) -> dict[str, Any]:
    cold, warm, fresh = _median(report.cold_ms), _median(report.warm_ms), _median(report.fresh_ms)
    return {
        "cold_median_ms": cold,
        "cold_p90_ms": percentile(report.cold_ms, 0.90),
        "first_cold_ms": report.first_cold_ms if report.first_cold_ms is not None else math.nan,
        "warm_median_ms": warm,
        "fresh_interpreter_median_ms": fresh,
        "cold_over_fresh": cold / fresh if fresh > 0 else math.nan,
        "cold_minus_warm_ms": cold - warm,
    }


def _preload_figures(preload: PreloadReport) -> dict[str, Any]:
    heavy = _median(preload.cold_ms[HEAVY])
    preloaded = _median(preload.cold_ms[HEAVY_PRELOADED])
    return {
        "heavy_cold_median_ms": heavy,
        "heavy_cold_p90_ms": percentile(preload.cold_ms[HEAVY], 0.90),
        "heavy_preloaded_cold_median_ms": preloaded,
        "heavy_preloaded_cold_p90_ms": percentile(preload.cold_ms[HEAVY_PRELOADED], 0.90),
        "preloaded_over_not_preloaded": preloaded / heavy if heavy > 0 else math.nan,
        "not_preloaded_minus_preloaded_ms": heavy - preloaded,
        "import_median_ms": _median(preload.import_ms),
        "template_rss_mb": preload.template_rss_mb,
    }


def _print_table(report: Report) -> None:
    preload = report.preload
    rows = [
        ("cold start to first answer", report.cold_ms),
        (
            "first cold start after `ketch: ready`",
            [] if report.first_cold_ms is None else [report.first_cold_ms],
        ),
        ("warm request", report.warm_ms),
        ("fresh interpreter to READY", report.fresh_ms),
        (f"cold start, {HEAVY} (no preload)", preload.cold_ms[HEAVY]),
        (f"cold start, {HEAVY_PRELOADED} (template)", preload.cold_ms[HEAVY_PRELOADED]),
        ("heavy imports in a fresh interpreter", preload.import_ms),
    ]
    header = f"{'figure':<40}{'n':>5}{'median ms':>11}{'p90 ms':>10}{'min ms':>10}{'max ms':>10}"
    print(header)
    print("-" * len(header))
    for name, values in rows:
        if not values:
            print(f"{name:<40}{0:>5}{'-':>11}{'-':>10}{'-':>10}{'-':>10}")
            continue
        print(
            f"{name:<40}{len(values):>5}{_median(values):>11.2f}"
            f"{percentile(values, 0.90):>10.2f}{min(values):>10.2f}{max(values):>10.2f}"
        )


def _print_figures(figures: dict[str, Any], report: Report) -> None:
    cold = figures["cold_median_ms"]
    if math.isfinite(cold):
        verdict = "meets" if cold <= COLD_START_TARGET_MS else "MISSES"
        stretch = "meets" if cold <= COLD_START_STRETCH_MS else "misses"
        print(
            f"cold start to first answer: median {cold:.2f} ms, p90 "
            f"{figures['cold_p90_ms']:.2f} ms over {len(report.cold_ms)} cycles ({verdict} the "
            f"target <= {COLD_START_TARGET_MS:g} ms; {stretch} the stretch <= "
            f"{COLD_START_STRETCH_MS:g} ms)"
        )
    if math.isfinite(figures["warm_median_ms"]) and math.isfinite(cold):
        print(
            f"warm median {figures['warm_median_ms']:.2f} ms: starting the worker adds "
            f"{figures['cold_minus_warm_ms']:.2f} ms"
        )
    if math.isfinite(figures["cold_over_fresh"]):
        print(
            f"cold start / fresh interpreter (medians): {cold:.2f} / "
            f"{figures['fresh_interpreter_median_ms']:.2f} ms = {figures['cold_over_fresh']:.3f}"
        )


def _print_preload(figures: dict[str, Any], preload: PreloadReport) -> None:
    for model, how in ((HEAVY, "forkserver"), (HEAVY_PRELOADED, "template")):
        median = figures[f"{model}_cold_median_ms"]
        if math.isfinite(median):
            print(
                f"preload: {model} ({how}) cold start to first answer: median {median:.2f} ms, "
                f"p90 {figures[f'{model}_cold_p90_ms']:.2f} ms over "
                f"{len(preload.cold_ms[model])} cycles"
            )
    ratio = figures["preloaded_over_not_preloaded"]
    if math.isfinite(ratio):
        print(
            f"preload: preloaded / not preloaded (medians): "
            f"{figures['heavy_preloaded_cold_median_ms']:.2f} / "
            f"{figures['heavy_cold_median_ms']:.2f} ms = {ratio:.3f}; preload saves "
            f"{figures['not_preloaded_minus_preloaded_ms']:.2f} ms, the imports alone take "
            f"{figures['import_median_ms']:.2f} ms in a fresh interpreter"
        )
    if preload.template_rss_mb is not None:
        print(
            f"preload: the template of {HEAVY_PRELOADED} (pid {preload.template_pid}) holds "
            f"{preload.template_rss_mb} MB of resident memory while the pool is at zero"
        )


def _noisy(cpu: CpuShares | None, during: str) -> None:
    if cpu is not None and (cpu.other or 0.0) > NOISY_OTHER_CPU:
        print(
            f"WARNING: other processes used {100 * (cpu.other or 0.0):.0f}% of a core "
            f"during the {during}; the machine was not quiet, so these figures are unreliable"
        )


def _print_warnings(report: Report) -> None:
    _noisy(report.cpu, "cycles")
    _noisy(report.preload.cpu, "preload cycles")
    for warning in report.warnings:
        print(f"WARNING: {warning}")
    for failure in report.failures:
        print(f"FAILED: {failure}")


def _json_report(report: Report, figures: dict[str, Any], preload_figures: dict[str, Any]) -> str:
    preload = report.preload
    payload = {
        "cycles": report.cycles,
        "idle_timeout_s": report.idle_timeout_s,
        **figures,
        "targets_ms": {"cold_median": COLD_START_TARGET_MS, "stretch": COLD_START_STRETCH_MS},
        "cold_ms": report.cold_ms,
        "fresh_interpreter_ms": report.fresh_ms,
        "cold_starts_counted": report.cold_starts_counted,
        "server_cpu_cores": report.cpu.server if report.cpu else None,
        "other_cpu_cores": report.cpu.other if report.cpu else None,
        "server_exit_code": report.server_exit_code,
        "preload": {
            "heavy_imports": list(HEAVY_IMPORTS),
            **preload_figures,
            "template_pid": preload.template_pid,
            "first_cold_ms": preload.first_cold_ms,
            "cold_ms": preload.cold_ms,
            "import_ms": preload.import_ms,
            "cold_starts_counted": preload.cold_starts_counted,
            "server_cpu_cores": preload.cpu.server if preload.cpu else None,
            "other_cpu_cores": preload.cpu.other if preload.cpu else None,
            "server_exit_code": preload.server_exit_code,
        },
        "failures": report.failures,
        "warnings": report.warnings,
    }
    return json.dumps(finite(payload))


def print_report(report: Report, as_json: bool) -> int:
    """Print the figures (and, with ``as_json``, one line of JSON); return the exit status."""
    figures = _figures(report)
    preload_figures = _preload_figures(report.preload)
    _print_table(report)
    _print_figures(figures, report)
    _print_preload(preload_figures, report.preload)
    _print_warnings(report)
    if as_json:
        print(_json_report(report, figures, preload_figures))
    measured = report.cold_ms and report.fresh_ms and report.warm_ms
    preload_measured = all(report.preload.cold_ms.values()) and report.preload.import_ms
    return 1 if report.failures or not measured or not preload_measured else 0
