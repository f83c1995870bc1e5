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
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from batching_models import CASES, models_source
from batching_report import (
    Report,
    json_report,
    print_cases,
    print_table,
    print_warnings,
    summarise,
    unmeasured,
)
from batching_run import measure
from ketch_server import write_models


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
    source = models_source(args)
    with tempfile.TemporaryDirectory(prefix="ketch-bench-batching-") as directory:
        models_file = write_models(Path(directory), source)
        print("starting ketch ...", file=sys.stderr, flush=True)
        measure(args, models_file, report)
    summarise(report, args.slo_ms)

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
    print_table(report)
    print_cases(report, args)
    print_warnings(report)
    problems = unmeasured(report, args.cases)
    for problem in problems:
        if problem not in report.failures:
            print(f"FAILED: {problem}")
    if args.json:
        print(json_report(report))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
