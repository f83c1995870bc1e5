"""Models the end-to-end tests serve with `ketch serve tests/servable.py`."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np

import ketch


@ketch.model
def double(xs: list[float]) -> list[float]:
    return [2 * x for x in xs]


@ketch.model(name="scale", version="1")
def scale_v1(xs: list[float]) -> list[float]:
    return [10 * x for x in xs]


@ketch.model(name="scale", version="2")
def scale_v2(xs: list[float]) -> list[float]:
    return [100 * x for x in xs]


@ketch.model(max_batch_size=4)
def batch_sizes(xs: list[float]) -> list[int]:
    """Answers each input with the size of the batch it was computed in; takes 20 ms a batch,
    so that requests arriving meanwhile (even from a slow client) queue up behind it."""
    time.sleep(0.02)  # the model's compute time, not a wait for anything
    return [len(xs)] * len(xs)


@ketch.model
def row_sums(batch: np.ndarray) -> np.ndarray:
    """A numpy model: gets one stacked array, returns one array."""
    return batch.sum(axis=1)


@ketch.model
def normalize(batch: np.ndarray) -> np.ndarray:
    return batch / np.linalg.norm(batch, axis=1, keepdims=True)


@ketch.model
async def async_double(xs: list[float]) -> list[float]:
    await asyncio.sleep(0)
    return [2 * x for x in xs]


@ketch.model
def fails(xs: list[float]) -> list[float]:
    raise ValueError(f"cannot handle {xs[0]!r}")


@ketch.model
def wrong_count(xs: list[float]) -> list[float]:
    return [*xs, 0.0]


@ketch.model
def unsendable(xs: list[float]) -> list[object]:
    return [object() for _ in xs]


@ketch.model
def pid(xs: list[float]) -> list[int]:
    return [os.getpid()] * len(xs)
