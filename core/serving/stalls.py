"""Stalled batches: a worker that holds a batch far longer than the model usually takes (it
hangs, or it is a peer that never answers) has the batch retried on another worker, well
before the request's deadline; one that keeps stalling is dropped.

:class:`StallWatch` keeps a model version's recent batch times and says which held batches are
stalls; the queue (:mod:`ketch.serving.queue`) looks every :data:`STALL_CHECK_S` while it has
batches in flight, and retries and drops what the watch names. Here too: each worker's slot
(its batches in flight, its stalls) and :func:`pick_worker`, which slot the next batch goes to.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ketch.serving.batching import BatchSizer
from ketch.serving.jobs import Part
from ketch.serving.sink import Worker

#: How many times the model's usual batch time (the p99 of the last ones) makes a stall.
STALL_FACTOR = 10.0
#: Never a stall below this: a busy machine's scheduling noise is not a hung worker.
STALL_MIN_S = 1.0
#: Batch times observed before the usual one is trusted (unless ``stall_timeout_s`` is set).
STALL_SAMPLES_NEEDED = 20
#: The stall time until then: long enough for a first batch that warms a framework up,
#: well within the default request timeout, so a peer that never answers costs no request.
STALL_UNKNOWN_S = 30.0
#: Batch times the usual one is derived from.
_STALL_SAMPLES_KEPT = 256
#: How often a queue with batches in flight looks for stalled ones.
STALL_CHECK_S = 0.25
#: A worker is dropped after this many stalls without a timely answer between them, or once
#: it has held a stalled batch for this many stall times.
STALLS_BEFORE_DROP = 3


@dataclass(slots=True)
class Batch:
    id: int
    worker: Worker
    parts: list[Part]
    size: int
    sent_at: float
    #: Held too long: its parts were retried elsewhere, and its late answer is ignored.
    stalled: bool = False


@dataclass(slots=True)
class WorkerSlot:
    info: Worker
    #: Adapts this worker's batch size to the model's ``slo_ms``; None without one.
    sizer: BatchSizer | None
    batches: dict[int, Batch] = field(default_factory=dict)
    #: A send to it failed: it takes no batch until the sink reports it lost.
    unreachable: bool = False
    #: Stalls since its last timely answer.
    stalls: int = 0
    #: Stalled batches it still holds: while it does, it gets no more.
    stalled_batches: int = 0
    #: The last batch sent to it (0: none yet): who waited longest for one.
    last_batch_id: int = 0
    #: Its pool is replacing it (renewing its workers): it takes no new batch, and leaves
    #: once those it holds are answered.
    leaving: bool = False

    @property
    def has_room(self) -> bool:
        return (
            not self.unreachable
            and not self.leaving
            and not self.stalled_batches
            and len(self.batches) < self.info.capacity
        )


def pick_worker(slots: Iterable[WorkerSlot]) -> WorkerSlot | None:
    """The worker with room and the fewest batches in flight; among equals, the one sent to
    longest ago, so that every worker takes its share (not only the first to join)."""
    best: WorkerSlot | None = None
    for slot in slots:
        if slot.has_room and (
            best is None
            or (len(slot.batches), slot.last_batch_id) < (len(best.batches), best.last_batch_id)
        ):
            best = slot
    return best


class StallWatch:
    """The recent batch times of one model version, and the stalls they make."""

    def __init__(self) -> None:
        #: Seconds from send to answer of the last batches.
        self._times: deque[float] = deque(maxlen=_STALL_SAMPLES_KEPT)

    def observe(self, seconds: float) -> None:
        """A batch was answered ``seconds`` after it was sent."""
        self._times.append(seconds)

    def limit_s(self, stall_timeout_s: float | None) -> float:
        """How long a worker may hold a batch before it is a stall: the model's
        ``stall_timeout_s``, else :data:`STALL_FACTOR` times the p99 of the last batch times
        (at least :data:`STALL_MIN_S`), or :data:`STALL_UNKNOWN_S` until enough were timed."""
        if stall_timeout_s is not None:
            return stall_timeout_s
        if len(self._times) < STALL_SAMPLES_NEEDED:
            return STALL_UNKNOWN_S
        usual = float(np.percentile(self._times, 99))
        return max(STALL_MIN_S, STALL_FACTOR * usual)

    @staticmethod
    def overdue(
        slot: WorkerSlot, limit: float, now: float
    ) -> tuple[list[tuple[Batch, float]], str | None]:
        """The batches ``slot`` has held past ``limit`` that were not stalls yet (each with
        how long it has been held), marked stalled now; and why the worker must be dropped
        (:data:`STALLS_BEFORE_DROP`), or None."""
        stalled: list[tuple[Batch, float]] = []
        held_longest = 0.0
        for batch in slot.batches.values():
            held = now - batch.sent_at
            held_longest = max(held_longest, held)
            if batch.stalled or held < limit:
                continue
            batch.stalled = True
            slot.stalls += 1
            slot.stalled_batches += 1
            stalled.append((batch, held))
        if slot.stalls >= STALLS_BEFORE_DROP or held_longest >= STALLS_BEFORE_DROP * limit:
            why = (
                f"it stalled {slot.stalls} times, holding a batch for {held_longest:.1f} s "
                f"(a stall is {limit:.1f} s)"
            )
            return stalled, why
        return stalled, None
