"""Helpers the benchmark scripts share: their options, percentiles, and printing figures."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def finite(value: Any) -> Any:
    """``value`` made JSON-safe: JSON has no NaN, so a figure that could not be measured (a
    percentile of zero requests, say) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def print_comparison(
    baseline: str,
    direct: Mapping[str, float],
    through: Mapping[str, float],
    lines: Sequence[tuple[str, str, str]],
) -> None:
    """A table of ``(label, baseline key, ketch key)`` figures with ketch / baseline ratios."""
    print(f"{'figure':<44}{baseline:>12}{'ketch':>12}{'ratio':>9}")
    for label, mine, theirs in lines:
        ratio = through[theirs] / direct[mine]
        print(f"{label:<44}{direct[mine]:>12.3f}{through[theirs]:>12.3f}{ratio:>8.2f}x")


def report_framework_run(
    baseline: str,
    direct: Mapping[str, float],
    through: Mapping[str, float],
    batched: str,
    batch: int,
    as_json: bool,
    detail: str = "",
) -> int:
    """What every framework benchmark prints: single-row latency, rows per second in batched
    calls and in one-row calls, ``baseline`` against ketch, then ketch's errors (``detail``
    adds to their line). Returns the exit status: 1 when ketch answered any error.

    :param batched: the label of the batched calls' line.
    """
    one_row = f"rows/s, one-row calls on {through['one_row_requests_connections']:.0f} conns"
    lines = [
        ("single-row latency p50 (ms)", "single_p50_ms", "single_p50_ms"),
        ("single-row latency p99 (ms)", "single_p99_ms", "single_p99_ms"),
        (batched, "batched_rows_per_s", "batched_rows_per_s"),
        (one_row, "batched_rows_per_s", "one_row_requests_rows_per_s"),
    ]
    print_comparison(baseline, direct, through, lines)
    print(
        f"errors: {through['batched_errors']:.0f} in {batch}-row calls, "
        f"{through['one_row_requests_errors']:.0f} in one-row calls "
        f"(p99 {through['one_row_requests_p99_ms']:.1f} ms{detail})"
    )
    if as_json:
        print(json.dumps({baseline.replace("-", "_"): direct, "ketch": through}))
    return 0 if through["batched_errors"] == through["one_row_requests_errors"] == 0 else 1
