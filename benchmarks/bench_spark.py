"""A Spark ML pipeline served by ketch's ``spark`` runtime (numpy fast path, over HTTP) against
Spark's own ``PipelineModel.transform()`` in-process.

The pipeline is the one ``tests/frameworks/test_spark.py`` calls ``churn``, built and fitted by
the module both use, ``spark_pipelines.py``: StringIndexer, OneHotEncoder, VectorAssembler,
StandardScaler (with mean and std) and a binary LogisticRegression, fitted on 200 synthetic
rows (three numbers and a colour) with a ``local[1]`` SparkSession and saved to a temporary
directory. Each answer is the row's ``prediction`` and ``probability``. Then, one after the
other (never both at once, so neither competes with the other for the two cores):

- **Spark**, in this process: ``--spark-requests`` (50) single-row calls, each
  ``spark.createDataFrame([row]) -> transform -> select -> collect`` (what a service calling
  Spark per request does), after 5 untimed ones; then ``--spark-batches`` (20) calls on
  ``--batch-size`` (64) rows each. The session is stopped afterwards.
- **ketch**: ``ketch serve FILE --port 0 --broker tcp://127.0.0.1:*`` on a models file with
  ``ketch.deploy("churn", runtime="spark", ..., min_replicas=1, max_batch_size=64)``, waited
  for through its ``ketch: ready`` line; ``GET /models`` must say the fast path was taken.
  On one keep-alive connection, ``--requests`` (500) sequential single-row requests
  (``{"input": row}``, rotating over 64 rows, after ``--warmup`` untimed ones), then
  ``--batches`` (100) sequential requests of ``--batch-size`` rows (``{"inputs": [...]}``).

It prints the median and p99 latency of a single row, the rows per second of the batched calls,
and the ratios Spark / ketch, and checks ketch's answers against Spark's for the batch rows
(predictions equal, probabilities within 1e-6). Target: a single row through ketch under 5 ms
(median). The exit code is non-zero when an answer differs, a request fails or the server does
not take the fast path.

Needs pyspark and Java: ``pip install -e '.[spark]'``, then
``python benchmarks/bench_spark.py [--requests 500] [--json]`` (about a minute here).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from keepalive import KeepAliveConnection
from ketch_server import KetchServer, write_models
from procstat import CpuSample, CpuShares, system_busy_seconds
from report import at_least, finite, percentile
from server_process import ServerError
from spark_pipelines import COLUMNS, fit_pipelines, local_spark, synthetic_rows

TARGET_P50_MS = 5.0
REQUEST_TIMEOUT_S = 60.0
NOISY_OTHER_CPU = 0.25
OUTPUTS = ("prediction", "probability")
MODELS_SOURCE = """
import ketch

churn = ketch.deploy(
    "churn",
    runtime="spark",
    path={path!r},
    output=["prediction", "probability"],
    min_replicas=1,
    max_batch_size=64,
)
"""


class BenchmarkError(Exception):
    """A figure could not be measured; the message says why."""


@dataclass
class Side:
    """One way of running the pipeline: its single-row latencies and its batched rate."""

    name: str
    single_ms: list[float] = field(default_factory=list)
    batch_ms: list[float] = field(default_factory=list)
    batch_size: int = 64
    #: Machine CPU busy during the measurement, in cores; for ketch also the server's share.
    machine_cores: float | None = None
    cpu: CpuShares | None = None

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.single_ms) if self.single_ms else math.nan

    @property
    def p99_ms(self) -> float:
        return percentile(self.single_ms, 0.99)

    @property
    def rows_per_s(self) -> float:
        total_s = sum(self.batch_ms) / 1000
        return self.batch_size * len(self.batch_ms) / total_s if total_s else math.nan


# -- Spark ------------------------------------------------------------------------------------


def measure_spark(
    args: argparse.Namespace, folder: Path, rows: list[dict[str, Any]]
) -> tuple[Side, list[list[Any]]]:
    """Fit and save the pipeline, time Spark's transform on it, stop the session.

    Returns Spark's figures and its answers (prediction, probability) for the first batch.
    """
    with local_spark() as spark:
        model = fit_pipelines(spark, folder, ["churn"])["churn"]
        schema = "a double, b double, c double, color string"

        def run(batch: list[dict[str, Any]]) -> list[list[Any]]:
            frame = spark.createDataFrame([tuple(r[k] for k in COLUMNS) for r in batch], schema)
            answers = model.transform(frame).select(*OUTPUTS).collect()
            return [[r.prediction, r.probability.toArray().tolist()] for r in answers]

        side = Side("spark transform", batch_size=args.batch_size)
        for row in rows[:5]:
            run([row])  # the JVM compiles the first calls' code
        busy = system_busy_seconds()
        started = time.monotonic()
        for i in range(args.spark_requests):
            begin = time.perf_counter_ns()
            run([rows[i % len(rows)]])
            side.single_ms.append((time.perf_counter_ns() - begin) / 1e6)
        first: list[list[Any]] = []
        for _ in range(args.spark_batches):
            begin = time.perf_counter_ns()
            answers = run(rows[: args.batch_size])
            side.batch_ms.append((time.perf_counter_ns() - begin) / 1e6)
            first = first or answers
        after = system_busy_seconds()
        if busy is not None and after is not None:
            side.machine_cores = (after - busy) / (time.monotonic() - started)
        return side, first


# -- ketch ------------------------------------------------------------------------------------


class Client:
    """One keep-alive connection timing ``POST /models/churn/predict``."""

    def __init__(self, base_url: str) -> None:
        self._connection = KeepAliveConnection(
            base_url + "/models/churn/predict", REQUEST_TIMEOUT_S
        )

    def request_bytes(self, body: Any) -> bytes:
        return self._connection.request_bytes(json.dumps(body).encode())

    def timed(self, request: bytes) -> tuple[float, Any]:
        """Milliseconds from sending to having read the whole answer, and the answer."""
        url = self._connection.url
        started = time.perf_counter_ns()
        try:
            status, body, closes = self._connection.exchange(request)
        except (OSError, ValueError) as exc:
            raise BenchmarkError(f"POST {url} failed: {exc!r}") from exc
        elapsed_ms = (time.perf_counter_ns() - started) / 1e6
        if closes:
            # Hypercorn closes a keep-alive connection after 1,000 requests: open the next one
            # now, outside the timed part.
            self._connection.reconnect()
        if status != 200:
            raise BenchmarkError(f"POST {url} answered {status}: {body[:300]!r}")
        return elapsed_ms, json.loads(body)

    def close(self) -> None:
        self._connection.close()


def measure_ketch(
    args: argparse.Namespace, folder: Path, rows: list[dict[str, Any]]
) -> tuple[Side, list[Any], dict[str, Any]]:
    """Serve the saved pipeline and time it; returns the figures, ketch's answers for the
    first batch, and the model's ``runtime_info``."""
    models = write_models(folder, MODELS_SOURCE.format(path=str(folder / "churn")))
    side = Side("ketch (fast path)", batch_size=args.batch_size)
    inputs = [{k: r[k] for k in COLUMNS} for r in rows]
    server = KetchServer(models)
    with server:
        base_url = server.start(args.startup_timeout)
        client = Client(base_url)
        try:
            singles = [client.request_bytes({"input": row}) for row in inputs[: args.batch_size]]
            batch = client.request_bytes({"inputs": inputs[: args.batch_size]})
            for i in range(args.warmup):
                client.timed(singles[i % len(singles)])
            info = server.model_status("churn").get("runtime_info", {})
            before = CpuSample.take(server.pgid)
            for i in range(args.requests):
                elapsed, _ = client.timed(singles[i % len(singles)])
                side.single_ms.append(elapsed)
            answers: list[Any] = []
            for _ in range(args.batches):
                elapsed, reply = client.timed(batch)
                side.batch_ms.append(elapsed)
                answers = answers or reply["outputs"]
            side.cpu = CpuShares.between(before, CpuSample.take(server.pgid))
        finally:
            client.close()
    return side, answers, info


# -- report -----------------------------------------------------------------------------------


def compare(ketch: list[Any], spark: list[list[Any]]) -> list[str]:
    """Where ketch's answers differ from Spark's (predictions exactly, probabilities 1e-6)."""
    problems = []
    for row, (got, (prediction, probability)) in enumerate(zip(ketch, spark, strict=True)):
        if got["prediction"] != prediction:
            problems.append(f"row {row}: prediction {got['prediction']} != Spark's {prediction}")
        gap = max(abs(g - w) for g, w in zip(got["probability"], probability, strict=True))
        if gap > 1e-6:
            problems.append(f"row {row}: probability differs from Spark's by {gap:.3g}")
    return problems


def figures(ketch: Side, spark: Side) -> dict[str, Any]:
    return {
        side.name: {
            "single_row_p50_ms": side.p50_ms,
            "single_row_p99_ms": side.p99_ms,
            "single_requests": len(side.single_ms),
            "batch_rows_per_s": side.rows_per_s,
            "batches": len(side.batch_ms),
        }
        for side in (ketch, spark)
    } | {
        "ratios": {
            "single_row_p50_spark_over_ketch": spark.p50_ms / ketch.p50_ms,
            "single_row_p99_spark_over_ketch": spark.p99_ms / ketch.p99_ms,
            "batch_rows_per_s_ketch_over_spark": ketch.rows_per_s / spark.rows_per_s,
        },
        "target_p50_ms": TARGET_P50_MS,
        "target_met": ketch.p50_ms < TARGET_P50_MS,
    }


def print_report(ketch: Side, spark: Side, batch_size: int) -> None:
    print(f"\n{'':20} {'1 row p50 ms':>13} {'1 row p99 ms':>13} {batch_size:>4}-row rows/s")
    for side in (ketch, spark):
        print(f"{side.name:20} {side.p50_ms:13.3f} {side.p99_ms:13.3f} {side.rows_per_s:16,.0f}")
    print(
        f"\nspark / ketch: single row {spark.p50_ms / ketch.p50_ms:.0f}x slower (median), "
        f"{spark.p99_ms / ketch.p99_ms:.0f}x (p99); ketch / spark: "
        f"{ketch.rows_per_s / spark.rows_per_s:.1f}x the rows/s in {batch_size}-row batches"
    )
    verdict = "met" if ketch.p50_ms < TARGET_P50_MS else "NOT met"
    print(f"target: one row through ketch under {TARGET_P50_MS:g} ms (median): {verdict}")
    if ketch.cpu is not None:
        other = ketch.cpu.other
        print(
            f"CPU during ketch's runs (cores): server {ketch.cpu.server or 0:.2f}, "
            f"client {ketch.cpu.client:.2f}, other {other or 0:.2f}"
        )
        if other is not None and other > NOISY_OTHER_CPU:
            print("warning: other processes used the CPU during the run; figures are suspect")
    if spark.machine_cores is not None:
        print(f"machine CPU busy during Spark's runs: {spark.machine_cores:.2f} cores")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=at_least(1), default=500, help="ketch single rows")
    parser.add_argument("--warmup", type=at_least(0), default=50, help="ketch untimed rows")
    parser.add_argument("--batches", type=at_least(1), default=100, help="ketch batches")
    parser.add_argument("--spark-requests", type=at_least(1), default=50, help="Spark rows")
    parser.add_argument("--spark-batches", type=at_least(1), default=20, help="Spark batches")
    parser.add_argument("--batch-size", type=at_least(1), default=64, help="rows a batch")
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to ready")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)

    rows = synthetic_rows(max(args.batch_size, 64), seed=1)
    with tempfile.TemporaryDirectory(prefix="ketch-bench-spark-") as directory:
        folder = Path(directory)
        print("fitting the pipeline and timing Spark's transform ...", file=sys.stderr)
        spark, spark_answers = measure_spark(args, folder, rows)
        print("timing ketch ...", file=sys.stderr, flush=True)
        try:
            ketch, ketch_answers, info = measure_ketch(args, folder, rows)
        except ServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print_report(ketch, spark, args.batch_size)
    problems = compare(ketch_answers, spark_answers)
    if info.get("path") != "fast":
        problems.append(f"ketch did not take the fast path: {info}")
    for problem in problems[:10]:
        print(f"error: {problem}", file=sys.stderr)
    if args.json:
        report = figures(ketch, spark) | {"runtime_info": info, "problems": problems}
        report["cpu"] = asdict(ketch.cpu) if ketch.cpu else None
        print(json.dumps(finite(report)))
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
