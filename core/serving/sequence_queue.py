"""The queue of a sequence model: a :class:`~ketch.serving.queue.ModelQueue` whose requests
are steps of sequences (:mod:`ketch.serving.sequences`), each sent only to its sequence's
worker, and failed rather than retried elsewhere when that worker is lost."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ketch.observability.metrics import ModelMetrics
from ketch.serving import refusals
from ketch.serving.jobs import Part, take_batch
from ketch.serving.queue import ModelQueue
from ketch.serving.sequences import Sequences
from ketch.serving.sink import BatchSink, Worker
from ketch.specs.models import ModelSpec

if TYPE_CHECKING:
    from collections.abc import Callable

    from ketch.plugin_manager import Plugins


class SequenceQueue(ModelQueue):
    """Requests and workers of one sequence model version."""

    def __init__(
        self,
        spec: ModelSpec,
        sink: BatchSink,
        batch_ids: Callable[[], int],
        metrics: ModelMetrics,
        observers: Plugins | None = None,
    ) -> None:
        super().__init__(spec, sink, batch_ids, metrics, observers)
        #: Its active sequences, each bound to one worker; a sequence that ends lets the pool
        #: look again (a worker holding none may be scaled down).
        self.sequences = Sequences(lambda: self.spec, lambda: self._load_moved(always=True))

    def pump(self) -> None:
        """Each worker with room takes the steps of its own sequences and of new ones (which
        it is bound to from then on), the worker holding the fewest sequences first."""
        sequences = self.sequences
        while self._pending:
            with_room = [w for w in self._workers.values() if w.has_room]
            with_room.sort(key=lambda w: sequences.held_by(w.info.identity))
            for worker in with_room:
                limit = worker.sizer.limit if worker.sizer is not None else self.spec.batch_limit
                if self._should_wait(limit):
                    return
                parts = take_batch(self._pending, limit, worker.info.identity)
                self._queued_items -= sum(part.size for part in parts)
                if parts:
                    for part in parts:
                        binding = part.job.binding
                        if binding is not None and binding.worker is None:
                            sequences.bind(binding, worker.info.identity)
                    self._send(worker, parts)
                    break  # which worker holds the fewest may have changed
            else:
                return  # nothing waiting can go to a worker with room

    def holds_state(self, worker: bytes) -> bool:
        return self.sequences.held_by(worker) > 0

    def _retry_parts(self, parts: list[Part], worker: Worker, reason: str) -> None:
        """A sequence's state stays with its worker: its steps there fail, never retried."""
        self.sequences.worker_lost(worker.identity, reason)
        for part in parts:
            if part.job.binding is not None:
                part.job.fail(refusals.sequence_lost(self.spec, part.job.binding))
        super()._retry_parts(parts, worker, reason)

    def remove_worker(self, info: Worker, reason: str) -> None:
        super().remove_worker(info, reason)
        self.sequences.worker_lost(info.identity, reason)
        for part in self._pending:
            binding = part.job.binding
            if binding is not None and binding.worker == info.identity:
                part.job.fail(refusals.sequence_lost(self.spec, binding))


def queue_class(spec: ModelSpec) -> type[ModelQueue]:
    """The queue a model version gets."""
    return SequenceQueue if spec.sequence else ModelQueue
