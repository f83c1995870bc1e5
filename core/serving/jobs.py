"""A request on its way through a model queue: its inputs, deadline, parts and future."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ketch.types import Outputs

#: A request's inputs: a list, or for a numpy model one array with an input per row.
Inputs = list[Any] | np.ndarray


class PredictionError(Exception):
    """A request that cannot be answered with outputs: carries the HTTP status, the JSON body
    and any headers (``Retry-After`` on a 429)."""

    def __init__(self, status: int, error: str, **details: Any) -> None:
        super().__init__(error)
        self.status = status
        self.headers: dict[str, str] = {}
        self.body: dict[str, Any] = {"error": error, **details}


@dataclass(frozen=True, slots=True)
class Backoff:
    """A crash-looping model's wait before its next worker starts."""

    cause: str
    quick_exits: int
    delay_s: float
    #: ``time.monotonic()`` of the next attempt.
    next_attempt_at: float

    def retry_after_s(self, now: float) -> int:
        return max(1, math.ceil(self.next_attempt_at - now))


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a request must be answered: ``at`` (``time.monotonic()``), and the time it was
    given (``budget_s``), which its 504 quotes."""

    at: float
    budget_s: float


class Job:
    """The inputs of one request and the future its handler awaits.

    :param deadline: by when it must be answered (or get a 504).
    """

    __slots__ = (
        "arrived",
        "chunks",
        "cold_deadline",
        "deadline",
        "dispatched",
        "future",
        "inputs",
        "queued",
        "remaining",
        "timer",
    )

    def __init__(
        self, inputs: Inputs, future: asyncio.Future[Outputs], arrived: float, deadline: Deadline
    ) -> None:
        self.inputs = inputs
        self.future = future
        self.arrived = arrived
        self.deadline = deadline
        self.remaining = len(inputs)
        self.chunks: list[tuple[int, Outputs]] = []
        #: Set when the job arrived with no worker ready: the latest it may wait for one.
        self.cold_deadline: float | None = None
        #: Whether any of its inputs has been sent to a worker.
        self.dispatched = False
        #: Inputs of this job waiting in the queue (not yet sent to a worker).
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None

    def deliver(self, start: int, outputs: Outputs) -> None:
        if self.future.done():
            return
        if len(outputs) == len(self.inputs):
            self.future.set_result(outputs)
            return
        self.chunks.append((start, outputs))
        self.remaining -= len(outputs)
        if self.remaining == 0:
            self.future.set_result(_join_chunks(self.chunks))

    def fail(self, error: PredictionError) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def status(self) -> int:
        """The HTTP status of the answer, once the future is done: 200 with outputs, the
        error's, or 499 (a client gone before its answer) when the request was cancelled."""
        if self.future.cancelled():
            return 499
        error = self.future.exception()
        if error is None:
            return 200
        return error.status if isinstance(error, PredictionError) else 500


def _join_chunks(chunks: list[tuple[int, Outputs]]) -> Outputs:
    ordered = [outputs for _, outputs in sorted(chunks, key=lambda chunk: chunk[0])]
    if all(isinstance(part, np.ndarray) for part in ordered):
        return np.concatenate(ordered)
    return [output for part in ordered for output in part]


@dataclass(slots=True)
class Part:
    """A slice ``[start, stop)`` of a job's inputs, the unit batches are made of."""

    job: Job
    start: int
    stop: int
    attempts: int = 0

    @property
    def size(self) -> int:
        return self.stop - self.start

    def inputs(self) -> Inputs:
        return self.job.inputs[self.start : self.stop]

    def item_shape(self) -> tuple[int, ...] | None:
        """The shape of each input, for a numpy job; batches only join equal shapes."""
        inputs = self.job.inputs
        return inputs.shape[1:] if isinstance(inputs, np.ndarray) else None
