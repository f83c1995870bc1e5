"""Adaptive batch sizes under a latency objective: Clipper's AIMD, per worker.

With ``slo_ms`` set, each worker's batches start at one input. After every batch the worker
computed, its latency (from sending the batch to its reply) is compared with the batch's
share of the objective:

- comfortably below it (under :data:`INCREASE_BELOW` of the target) and the batch was full:
  the limit grows by one input (additive increase). Until the first batch that is too slow
  it doubles instead (TCP's slow start): a new worker facing a queue reaches a useful size
  in a handful of batches rather than dozens, which with ``slo_ms`` as every request's
  deadline is the difference between meeting it and a burst of 504s;
- above it: the limit shrinks by at least :data:`DECREASE_FACTOR`, more when the batch
  overshot by more (multiplicative decrease), never below one.

The target is half of what is left of the objective after ``max_delay_ms``: a request that
arrives just after its worker took a batch waits for that batch, then for its own, so two
batch latencies must fit in the objective. :class:`BatchSizer` is pure; the dispatcher feeds
it measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ketch.specs.models import ModelSpec

#: Grow only while a full batch took less than this fraction of the target.
INCREASE_BELOW = 0.8
#: Shrink to at most this fraction of the limit when a batch took longer than the target.
DECREASE_FACTOR = 0.9


def batch_latency_target_s(slo_ms: float, max_delay_ms: float) -> float:
    """The latency each batch should stay under so requests meet ``slo_ms``."""
    return max(slo_ms - max_delay_ms, 0.0) / 2 / 1000


@dataclass(slots=True)
class BatchSizer:
    """The batch size limit of one worker.

    :param target_s: the latency a batch should stay under.
    :param max_size: the model's ``max_batch_size``, the limit's ceiling.
    """

    target_s: float
    max_size: int
    size: float = 1.0
    batches: int = 0
    #: Doubling until the first batch over the target (slow start), then adding one.
    slow_start: bool = True

    @property
    def limit(self) -> int:
        return max(1, min(self.max_size, math.floor(self.size)))

    def observe(self, batch_size: int, latency_s: float) -> None:
        """Adjust the limit after a batch of ``batch_size`` inputs took ``latency_s``."""
        self.batches += 1
        if latency_s > self.target_s:
            self.slow_start = False
            shrink = min(DECREASE_FACTOR, self.target_s / latency_s)
            self.size = max(1.0, self.limit * shrink)
        elif latency_s < INCREASE_BELOW * self.target_s and batch_size >= self.limit:
            grown = self.limit * 2.0 if self.slow_start else self.limit + 1.0
            self.size = min(float(self.max_size), grown)


def batch_sizer(spec: ModelSpec) -> BatchSizer | None:
    """A new worker's sizer for ``spec``; None without an ``slo_ms`` to adapt to."""
    if spec.slo_ms is None:
        return None
    return BatchSizer(batch_latency_target_s(spec.slo_ms, spec.max_delay_ms), spec.batch_limit)
