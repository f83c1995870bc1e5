"""The models file bench_batching.py serves: per case, one model batching off, one adaptive.

Two cases, each a pair of models with the same body that differ only in how they batch
(``*_single``: ``max_batch_size=1``; ``*_adaptive``: ``max_batch_size``, ``max_delay_ms`` and
``slo_ms``), one worker each: ``burn``, a busy loop on thread CPU time, and ``matmul``, a numpy
product of the stacked batch with a seeded ``(D, D)`` float32 matrix.
"""

from __future__ import annotations

import argparse
import json

CASES = ("burn", "matmul")
VARIANTS = ("single", "adaptive")
#: The seed of the matmul model's weight matrix.
SEED = 20240601
BURN_BODY = b'{"input": 1}'

MODELS_SOURCE = """
    import time

    import numpy as np

    import ketch

    BURN_S = {burn_ms!r} / 1000
    PER_INPUT_S = {per_input_ms!r} / 1000
    DIM = {dim!r}
    # The weight matrix W, stored transposed: W_T @ xs.T is xs @ W with the big matrix on the
    # left, which OpenBLAS computes about twice as fast for batches of a few rows.
    W_T = np.random.default_rng({seed!r}).standard_normal((DIM, DIM), dtype=np.float32)


    def _burn(xs):
        # CPU time of this thread, not a sleep or wall time: noise stretches the loop's wall
        # time, not the work it does.
        end = time.thread_time() + BURN_S + len(xs) * PER_INPUT_S
        while time.thread_time() < end:
            pass
        return xs


    def _matmul(xs):
        # JSON integers arrive as int64; (xs @ W).sum(axis=1), one figure per input.
        batch = np.asarray(xs, dtype=np.float32)
        return (W_T @ batch.T).sum(axis=0)


    @ketch.model(max_batch_size=1, min_replicas=1, max_replicas=1)
    def burn_single(xs):
        return _burn(xs)


    @ketch.model(
        max_batch_size={max_batch_size!r},
        max_delay_ms={max_delay_ms!r},
        slo_ms={slo_ms!r},
        min_replicas=1,
        max_replicas=1,
    )
    def burn_adaptive(xs):
        return _burn(xs)


    @ketch.model(max_batch_size=1, min_replicas=1, max_replicas=1, threads={threads!r})
    def matmul_single(xs: np.ndarray) -> np.ndarray:
        return _matmul(xs)


    @ketch.model(
        max_batch_size={max_batch_size!r},
        max_delay_ms={max_delay_ms!r},
        slo_ms={slo_ms!r},
        min_replicas=1,
        max_replicas=1,
        threads={threads!r},
    )
    def matmul_adaptive(xs: np.ndarray) -> np.ndarray:
        return _matmul(xs)
"""


def model_name(case: str, variant: str) -> str:
    return f"{case}_{variant}"


def matmul_body(dim: int) -> bytes:
    """One input of ``dim`` small integers (short JSON; the model makes them float32)."""
    return json.dumps({"input": [i % 7 - 3 for i in range(dim)]}, separators=(",", ":")).encode()


def models_source(args: argparse.Namespace) -> str:
    """:data:`MODELS_SOURCE` with the options of the command line."""
    return MODELS_SOURCE.format(
        burn_ms=args.burn_ms,
        per_input_ms=args.per_input_ms,
        dim=args.matmul_dim,
        threads=args.matmul_threads,
        seed=SEED,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        slo_ms=args.slo_ms,
    )
