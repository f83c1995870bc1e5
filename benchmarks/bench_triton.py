"""The triton runtime: a model on a Triton server through ketch against calling Triton directly.

The model is "affine" (3 float32 inputs, 2 outputs, ``x @ W + b``): so small that the figures
are the cost of the path, not of the model. It runs on the Triton Inference Server that
PyTriton bundles (on CPU), started with ``pytriton_server.py`` (shared with the test) from a
virtualenv with ``nvidia-pytriton`` (``--pytriton-python``; by default the one
``tests/frameworks/test_triton.py`` caches). The baseline calls Triton with tritonclient from
this process; ketch serves the model with ``ketch.deploy(..., runtime="triton")``
(``--replicas`` workers, 1 by default, and ``max_batch_size=64``) and is called over HTTP, its
workers calling Triton over ``--protocol`` (the baseline uses the same protocol). A worker
makes one call at a time, so the replicas are how many of ketch's calls Triton sees at once:

- single-row latency: ``--requests`` sequential one-row calls on one connection, median and
  p99;
- batched throughput: rows per second with ``--batch``-row calls on ``--connections``
  connections (closed loop), plus, for ketch, one-row calls on ``connections * batch / 4``
  connections, which ketch batches itself.

Needs ``tritonclient[http,grpc]`` beside ketch. Prints the figures and the ratios.

    python benchmarks/bench_triton.py [--protocol grpc] [--pytriton-python PATH]
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from framework_figures import latency_and_batched, one_row_requests
from ketch_server import KetchServer
from pytriton_server import cached_venv, run_server
from report import percentile, report_framework_run

#: Where the test suite keeps its PyTriton virtualenv.
CACHED_PYTRITON = cached_venv() / "bin" / "python"
#: Triton's batch limit for "affine": as big as ketch's batches, so that it never splits them.
AFFINE_MAX_BATCH = 64

SERVED = """
import ketch

affine = ketch.deploy("affine", runtime="triton", url="{url}", model="affine",
                      protocol="{protocol}", max_batch_size=64, max_delay_ms=1,
                      min_replicas={replicas}, max_replicas={replicas})
"""


class Direct:
    """Calls of "affine" on Triton with tritonclient, one client per thread."""

    def __init__(self, protocol: str, url: str) -> None:
        self.module: Any = importlib.import_module(f"tritonclient.{protocol}")
        self.url = url

    def client(self) -> Any:
        return self.module.InferenceServerClient(self.url)

    def counts(self) -> tuple[int, int]:
        """(rows inferred, model executions) so far, from Triton's statistics."""
        client = self.client()
        try:
            stats = client.get_inference_statistics("affine", **self._as_json())
        finally:
            client.close()
        (model,) = stats["model_stats"]
        return int(model.get("inference_count", 0)), int(model.get("execution_count", 0))

    def _as_json(self) -> dict[str, Any]:
        return {"as_json": True} if self.module.__name__.endswith("grpc") else {}

    def call(self, client: Any, batch: np.ndarray) -> np.ndarray:
        request = self.module.InferInput("x", list(batch.shape), "FP32")
        request.set_data_from_numpy(batch)
        result: np.ndarray = client.infer("affine", [request]).as_numpy("y")
        return result


def direct_figures(direct: Direct, rows: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    client = direct.client()
    try:
        for i in range(50):
            direct.call(client, rows[i : i + 1])  # warm the connection and the model
        latencies = []
        for i in range(args.requests):
            start = time.perf_counter()
            direct.call(client, rows[i % len(rows) : i % len(rows) + 1])
            latencies.append(time.perf_counter() - start)
    finally:
        client.close()
    calls = closed_loop(direct, rows[: args.batch], args.connections, args.duration)
    return {
        "single_p50_ms": 1000 * statistics.median(latencies),
        "single_p99_ms": 1000 * percentile(latencies, 0.99),
        "batched_rows_per_s": calls * args.batch / args.duration,
    }


def closed_loop(direct: Direct, batch: np.ndarray, connections: int, duration_s: float) -> int:
    """Calls completed inside a ``duration_s`` window (after 1 s of warm-up) by
    ``connections`` threads, each with its own client and one call in flight."""
    start = time.perf_counter() + 1.0
    end = start + duration_s
    counts = [0] * connections

    def run(index: int) -> None:
        client = direct.client()
        try:
            while (now := time.perf_counter()) < end:
                direct.call(client, batch)
                if now >= start and time.perf_counter() <= end:
                    counts[index] += 1
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts)


def ketch_figures(
    url: str, direct: Direct, rows: list[list[float]], args: argparse.Namespace
) -> dict[str, float]:
    figures = latency_and_batched(url, "affine", rows, args)
    inferred, executions = direct.counts()
    figures.update(one_row_requests(url, "affine", rows, args))
    now_inferred, now_executions = direct.counts()
    # Each worker makes one call at a time: this is the batch size ketch formed.
    figures["one_row_requests_rows_per_triton_call"] = (now_inferred - inferred) / max(
        1, now_executions - executions
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument(
        "--pytriton-python",
        type=Path,
        default=CACHED_PYTRITON,
        help=f"python of a virtualenv with nvidia-pytriton (default {CACHED_PYTRITON})",
    )
    parser.add_argument("--replicas", type=int, default=1, help="ketch workers (1)")
    parser.add_argument("--requests", type=int, default=300, help="single-row calls (300)")
    parser.add_argument("--batch", type=int, default=64, help="rows per batched call (64)")
    parser.add_argument("--connections", type=int, default=4, help="connections (4)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (5)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    if not args.pytriton_python.exists():
        parser.error(
            f"no {args.pytriton_python}: run tests/frameworks/test_triton.py once, or make a "
            "virtualenv with `pip install nvidia-pytriton` and pass its python"
        )

    generator = random.Random(1)
    rows = [[round(generator.uniform(-1, 1), 4) for _ in range(3)] for _ in range(256)]
    array = np.asarray(rows, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("starting Triton ...", file=sys.stderr)
        with run_server(
            args.pytriton_python,
            folder,
            models=("affine",),
            affine_max_batch_size=AFFINE_MAX_BATCH,
        ) as triton:
            triton_url = triton.grpc if args.protocol == "grpc" else triton.http
            print(f"Triton directly ({args.protocol}) ...", file=sys.stderr)
            client = Direct(args.protocol, triton_url)
            direct = direct_figures(client, array, args)
            served = SERVED.format(url=triton_url, protocol=args.protocol, replicas=args.replicas)
            (folder / "models.py").write_text(textwrap.dedent(served).lstrip())
            print("ketch ...", file=sys.stderr)
            with KetchServer(folder / "models.py") as server:
                url = server.start(120.0)
                through = ketch_figures(url, client, rows, args)

    print(
        f"affine 3->2 on PyTriton's Triton (CPU), over {args.protocol}: tritonclient directly "
        f"vs ketch over HTTP ({args.replicas} worker{'s' if args.replicas > 1 else ''})"
    )
    per_call = through["one_row_requests_rows_per_triton_call"]
    return report_framework_run(
        "direct",
        direct,
        through,
        f"rows/s, {args.batch}-row calls on {args.connections} conns",
        args.batch,
        args.json,
        detail=f", {per_call:.1f} rows per call to Triton",
    )


if __name__ == "__main__":
    raise SystemExit(main())
