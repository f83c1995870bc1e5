"""A framework runtime through ketch against calling the same model in-process, in one run.

The model is an MLP (``--dim`` inputs, two hidden layers of ``--hidden``, 10 outputs), saved
by the framework (``--framework torch``: a ``torch.export`` archive with a dynamic batch
dimension; ``tensorflow``: a SavedModel with a ``[None, dim]`` signature). The baseline loads
the same artifact in this process with one thread (the worker gets ``threads=1`` too) and calls
it directly; ketch serves it with ``ketch.deploy(..., runtime=FRAMEWORK)`` over HTTP:

- single-row latency: ``--requests`` sequential one-row calls (one keep-alive connection for
  ketch), median and p99;
- batched throughput: rows per second with ``--batch`` rows per call, sequentially in-process,
  and for ketch ``--connections`` closed-loop connections each sending ``--batch`` rows, plus
  the same connections sending one row each, which ketch batches itself.

Needs the framework installed beside ketch (``torch==2.13.0``, ``tensorflow-cpu``). Prints
the figures and the ratios.

    python benchmarks/bench_frameworks.py --framework torch
    python benchmarks/bench_frameworks.py --framework tensorflow
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from framework_figures import latency_and_batched, one_row_requests
from ketch_server import KetchServer
from report import percentile, report_framework_run

SERVED = """
import ketch

mlp = ketch.deploy("mlp", runtime="{framework}", path="{artifact}", max_batch_size=64,
             max_delay_ms=1, min_replicas=1, max_replicas=1, threads=1)
"""

#: A batch predict function called in-process: a float32 array in, an array out.
Direct = Callable[[np.ndarray], np.ndarray]


def build_torch(folder: Path, dim: int, hidden: int) -> tuple[str, Direct]:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(dim, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    ).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(4, dim),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "mlp.pt2"))
    loaded = torch.export.load(str(folder / "mlp.pt2")).module()
    torch.set_num_threads(1)

    def direct(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            result: np.ndarray = loaded(torch.from_numpy(batch)).numpy()
            return result

    return "mlp.pt2", direct


def build_tensorflow(folder: Path, dim: int, hidden: int) -> tuple[str, Direct]:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    generator = np.random.default_rng(0)
    sizes = [dim, hidden, hidden, 10]
    module = tf.Module()
    module.weights = [
        tf.Variable(generator.normal(0, 0.05, (a, b)).astype(np.float32))
        for a, b in itertools.pairwise(sizes)
    ]

    @tf.function(input_signature=[tf.TensorSpec([None, dim], tf.float32, name="x")])
    def serve(x: Any) -> Any:
        for i, weight in enumerate(module.weights):
            x = x @ weight
            if i < len(module.weights) - 1:
                x = tf.nn.relu(x)
        return {"scores": x}

    tf.saved_model.save(module, str(folder / "mlp"), signatures={"serving_default": serve})
    signature = tf.saved_model.load(str(folder / "mlp")).signatures["serving_default"]

    def direct(batch: np.ndarray) -> np.ndarray:
        result: np.ndarray = signature(x=tf.constant(batch))["scores"].numpy()
        return result

    return "mlp", direct


BUILDERS: dict[str, Callable[[Path, int, int], tuple[str, Direct]]] = {
    "torch": build_torch,
    "tensorflow": build_tensorflow,
}


def direct_figures(
    direct: Direct, rows: list[list[float]], args: argparse.Namespace
) -> dict[str, float]:
    latencies = []
    for i in range(args.requests):
        start = time.perf_counter()
        direct(np.asarray([rows[i % len(rows)]], dtype=np.float32))
        latencies.append(time.perf_counter() - start)
    batch = np.asarray(rows[: args.batch], dtype=np.float32)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.duration:
        direct(batch)
        done += args.batch
    elapsed = time.perf_counter() - start
    return {
        "single_p50_ms": 1000 * statistics.median(latencies),
        "single_p99_ms": 1000 * percentile(latencies, 0.99),
        "batched_rows_per_s": done / elapsed,
    }


def ketch_figures(url: str, rows: list[list[float]], args: argparse.Namespace) -> dict[str, float]:
    return {
        **latency_and_batched(url, "mlp", rows, args),
        **one_row_requests(url, "mlp", rows, args),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=sorted(BUILDERS), default="torch")
    parser.add_argument("--dim", type=int, default=256, help="inputs per row (default 256)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden units (default 512)")
    parser.add_argument("--requests", type=int, default=500, help="single-row calls (500)")
    parser.add_argument("--batch", type=int, default=64, help="rows per batched call (64)")
    parser.add_argument("--connections", type=int, default=4, help="HTTP connections (4)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (5)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)

    import random

    generator = random.Random(1)
    rows = [[round(generator.uniform(-1, 1), 4) for _ in range(args.dim)] for _ in range(256)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        artifact, call = BUILDERS[args.framework](folder, args.dim, args.hidden)
        served = SERVED.format(framework=args.framework, artifact=artifact)
        (folder / "models.py").write_text(textwrap.dedent(served).lstrip())
        print("in-process ...", file=sys.stderr)
        direct = direct_figures(call, rows, args)
        print("ketch ...", file=sys.stderr)
        with KetchServer(folder / "models.py") as server:
            url = server.start(120.0)
            through = ketch_figures(url, rows, args)

    print(
        f"{args.framework} MLP {args.dim}-{args.hidden}-{args.hidden}-10, one thread, "
        "in-process vs ketch"
    )
    return report_framework_run(
        "in-process", direct, through, f"rows/s, {args.batch}-row calls", args.batch, args.json
    )


if __name__ == "__main__":
    raise SystemExit(main())
