"""Who a model queue talks to: the :class:`BatchSink` its batches go to, the
:class:`PoolListener` it tells when its pool's needs change, and the worker type.

The broker (:class:`ketch.zmq_transport.broker.Broker`) is the real sink; unit tests give a
queue or a dispatcher a fake one. A sink answers a send at once: True when the batch left,
False when it cannot reach the worker, whose loss is then reported separately (as the broker's
``worker_lost`` event), never from inside the send.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, TypeAlias

from ketch.serving.jobs import Inputs
from ketch.specs.models import ModelSpec
from ketch.zmq_transport.broker import WorkerInfo

#: A worker that has said READY, with the spec it announced decoded.
Worker: TypeAlias = WorkerInfo[ModelSpec]


class BatchSink(Protocol):
    """What a model queue needs to hand a batch to one of its workers."""

    def send_batch(
        self,
        worker: Worker,
        batch_id: int,
        inputs: Inputs,
        params: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Send one batch (with each input's request parameters, for a model that takes
        them); False when it cannot be delivered.

        :raises ValueError: the inputs cannot be encoded for the wire (nothing was sent).
        """
        ...

    def drop(self, worker: Worker, reason: str) -> None:
        """Let ``worker`` go (told DISCONNECT, reported lost, from the caller's stack)."""
        ...


class WorkerLink(BatchSink, Protocol):
    """What the dispatcher needs of the broker besides sending and dropping: its workers."""

    def workers(self) -> Iterator[Worker]: ...


#: A process a pool started, wherever it runs: the id the supervisor gave it at launch, which
#: its READY announces (a pid names a process on one machine only, and a worker placed by Ray
#: has none until it runs).
ProcessKey = str


def process_of(worker: Worker) -> ProcessKey | None:
    """The process ``worker`` is, when a pool started it (None: started by hand)."""
    return worker.launch


class PoolListener(Protocol):
    """Who sizes a queue's pool (the pool manager); told when what the pool needs may have
    changed, it decides what to do."""

    def pool_changed(self, queue: Any) -> None:
        """``queue`` (a :class:`~ketch.serving.queue.ModelQueue`, which imports this module)
        may need another pool size."""

    def process_joined(self, process: ProcessKey) -> None:
        """``process``, which the pool started, said READY."""

    def process_stalled(self, worker: Worker, why: str) -> None:
        """``worker`` of this pool was dropped for stalling; if the pool started it, it may
        be hung, and must not linger."""
