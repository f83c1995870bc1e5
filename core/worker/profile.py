"""A model's profile, measured where its workers run: ``python -m ketch.worker.profile``.

The child of ``ketch profile`` (:mod:`ketch.cli.profile`): it loads the model exactly as a
worker does (:func:`ketch.worker.run.load`: the plan's resources applied first, the model's
runtime, the same batch call), then times that call on batches of each size asked, with the
sample inputs given, or made from the model's declared input tensor. It reads its request as
JSON on stdin and writes the measurements as JSON to the file descriptor named on its command
line; the model's own prints go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

from ketch.specs.models import ModelSpec
from ketch.specs.resources import Resources
from ketch.specs.resources import apply as apply_resources
from ketch.worker.plan import WorkerPlan
from ketch.worker.run import load


def measure(request: dict[str, Any]) -> dict[str, Any]:
    """``{"batches": [...]}`` for the request's plan, batch sizes, samples and repeats."""
    spec, predict = load(WorkerPlan.from_json(request["plan"]))
    # The option's resources over the function's own (which load applied last).
    apply_resources(Resources.from_dict(request["resources"]))
    samples = request["samples"] or made_samples(spec)
    batches = []
    for size in request["batch_sizes"]:
        batch = [samples[i % len(samples)] for i in range(size)]
        for _ in range(request["warmup"]):
            predict(batch, None)
        seconds = []
        for _ in range(request["repeats"]):
            began = time.perf_counter()
            predict(batch, None)
            seconds.append(time.perf_counter() - began)
        p50, p99 = np.percentile(seconds, [50, 99])
        batches.append(
            {
                "batch_size": size,
                "p50_ms": round(float(p50) * 1000, 4),
                "p99_ms": round(float(p99) * 1000, 4),
                "mean_ms": round(float(np.mean(seconds)) * 1000, 4),
                # Items a worker computes per second at this batch size, back to back.
                "throughput": round(size / float(np.mean(seconds)), 2),
                "samples": len(seconds),
            }
        )
    return {"batches": batches}


def made_samples(spec: ModelSpec) -> list[Any]:
    """Inputs for a model that declares one input tensor: random values of its datatype and
    shape (a dimension that may vary taken as 1). Raises ``ValueError`` for any other model,
    whose inputs the user must give."""
    tensors = spec.inputs or spec.hinted_inputs
    if len(tensors) != 1 or not tensors[0].numeric:
        raise ValueError(
            f"model {spec.label()!r} does not declare one numeric input tensor "
            f"({[t.describe() for t in tensors] or 'none'}): give sample inputs with --inputs"
        )
    (tensor,) = tensors
    shape = tuple(1 if dim == -1 else dim for dim in tensor.shape)
    generator = np.random.default_rng(0)
    return [generator.random(shape).astype(tensor.datatype) for _ in range(8)]


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m ketch.worker.profile ANSWER_FD < REQUEST")
    answer = os.fdopen(int(argv[0]), "w")
    request = json.load(sys.stdin)
    # The model's prints belong on stderr; the answer has its own pipe.
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        result: dict[str, Any] = measure(request)
    except ValueError as exc:
        result = {"error": str(exc)}
    json.dump(result, answer)
    answer.close()


if __name__ == "__main__":
    main(sys.argv[1:])
