"""A request on its way through a model queue: its inputs, deadline, parts and future."""

from __future__ import annotations

import asyncio
import math
from collections import deque
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


@dataclass(slots=True, eq=False)
class Binding:
    """The worker every request of one sequence goes to: the one its first request was sent
    to (None until then); see :mod:`ketch.serving.sequences`."""

    sequence_id: int | str
    worker: bytes | None = None
    #: Why the sequence is over, once it is (its last request, idleness, its worker lost).
    ended: str | None = None


class Job:
    """The inputs of one request and the future its handler awaits.

    :param deadline: by when it must be answered (or get a 504).
    :param params: the request's parameters, for a model that takes them.
    :param binding: the sequence it is a step of, for a sequence model: it goes to the
        sequence's worker only.
    """

    __slots__ = (
        "arrived",
        "binding",
        "chunks",
        "cold_deadline",
        "deadline",
        "dispatched",
        "future",
        "inputs",
        "params",
        "queued",
        "remaining",
        "timer",
    )

    def __init__(
        self,
        inputs: Inputs,
        future: asyncio.Future[Outputs],
        arrived: float,
        deadline: Deadline,
        params: dict[str, Any] | None = None,
        binding: Binding | None = None,
    ) -> None:
        self.inputs = inputs
        self.binding = binding
        #: The request's parameters, which each of its inputs takes to a model that takes them.
        self.params = params
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


#: Incompatible (differently shaped) parts a batch looks past before it is sent as it is.
_SCAN_AHEAD = 64


def take_batch(pending: deque[Part], limit: int, worker: bytes | None = None) -> list[Part]:
    """Up to ``limit`` waiting inputs out of ``pending``, oldest first (a part larger than
    the room left is split, its rest left at the front); for numpy models, only inputs of the
    first one's shape, the others waiting for a batch of their own shape. Parts of requests
    already answered (timed out, or failed through another part) are dropped.

    With ``worker`` (a sequence model's), only parts of sequences bound to that worker or to
    none yet: the others wait for their own worker, however many they are."""
    parts: list[Part] = []
    skipped: list[Part] = []  # left where they were, in their order
    other_shapes = 0
    room = limit
    shape: tuple[int, ...] | None = None
    while pending and room and other_shapes < _SCAN_AHEAD:
        part = pending.popleft()
        if part.job.future.done():
            continue  # no longer counted as queued
        binding = part.job.binding
        if worker is not None and binding is not None and binding.worker not in (None, worker):
            skipped.append(part)
            continue
        if parts and part.item_shape() != shape:
            skipped.append(part)
            other_shapes += 1
            continue
        shape = part.item_shape()
        if part.size > room:
            pending.appendleft(Part(part.job, part.start + room, part.stop, part.attempts))
            part = Part(part.job, part.start, part.start + room, part.attempts)
        part.job.queued -= part.size
        parts.append(part)
        room -= part.size
    pending.extendleft(reversed(skipped))
    return parts


def batch_inputs(parts: list[Part]) -> Inputs:
    """The inputs of ``parts`` as one batch: an array for a numpy model, else a list."""
    first = parts[0]
    if len(parts) == 1 and first.size == len(first.job.inputs):
        return first.job.inputs
    if isinstance(first.job.inputs, np.ndarray):
        return np.concatenate([part.inputs() for part in parts])
    return [x for part in parts for x in part.inputs()]


def wake_all(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)
    waiters.clear()


async def wait_until_woken(waiters: list[asyncio.Future[None]], timeout_s: float) -> bool:
    """Wait until the list's owner wakes it; False after ``timeout_s``."""
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await asyncio.wait_for(waiter, timeout_s)
    except TimeoutError:
        if waiter in waiters:
            waiters.remove(waiter)
        return False
    return True
