"""How a framework model performs through ketch, as the framework benchmarks measure it
(``bench_frameworks.py``, ``bench_triton.py``): single-row latency, rows per second in batched
calls, and in one-row calls from many connections (which ketch batches itself)."""

from __future__ import annotations

import argparse
import json
import statistics

from ketch_server import single_input_latencies
from loadgen import LoadSpec, run_load
from report import percentile


def latency_and_batched(
    url: str, model: str, rows: list[list[float]], args: argparse.Namespace
) -> dict[str, float]:
    """``args.requests`` sequential one-row calls, then ``args.batch``-row calls on
    ``args.connections`` connections for ``args.duration`` seconds."""
    single_input_latencies(url, model, rows, 50)  # warm the connection path and the worker
    latencies = single_input_latencies(url, model, rows, args.requests)
    batched = run_load(
        LoadSpec(
            f"{url}/models/{model}/predict",
            json.dumps({"inputs": rows[: args.batch]}).encode(),
            connections=args.connections,
            duration_s=args.duration,
            warmup_s=1.0,
        )
    )
    return {
        "single_p50_ms": 1000 * statistics.median(latencies),
        "single_p99_ms": 1000 * percentile(latencies, 0.99),
        "batched_rows_per_s": batched.requests_per_s * args.batch,
        "batched_errors": batched.errors,
    }


def one_row_requests(
    url: str, model: str, rows: list[list[float]], args: argparse.Namespace
) -> dict[str, float]:
    """One-row calls from as many connections as the batched calls had rows in flight
    (a quarter of them), for ``args.duration`` seconds."""
    single = run_load(
        LoadSpec(
            f"{url}/models/{model}/predict",
            json.dumps({"input": rows[0]}).encode(),
            connections=args.connections * args.batch // 4,
            duration_s=args.duration,
            warmup_s=1.0,
        )
    )
    return {
        "one_row_requests_rows_per_s": single.requests_per_s,
        "one_row_requests_connections": single.connections,
        "one_row_requests_p99_ms": single.p99_ms,
        "one_row_requests_errors": single.errors,
    }
