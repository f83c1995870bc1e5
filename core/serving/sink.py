"""Where a model queue's batches go: the :class:`BatchSink` protocol and the worker type.

The broker (:class:`ketch.zmq_transport.broker.Broker`) is the real sink; unit tests give a
queue or a dispatcher a fake one. A sink answers a send at once: True when the batch left,
False when it cannot reach the worker, whose loss is then reported separately (as the broker's
``worker_lost`` event), never from inside the send.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, TypeAlias

from ketch.serving.jobs import Inputs
from ketch.specs.models import ModelSpec
from ketch.zmq_transport.broker import WorkerInfo

#: A worker that has said READY, with the spec it announced decoded.
Worker: TypeAlias = WorkerInfo[ModelSpec]


class BatchSink(Protocol):
    """What a model queue needs to hand a batch to one of its workers."""

    def send_batch(self, worker: Worker, batch_id: int, inputs: Inputs) -> bool:
        """Send one batch; False when it cannot be delivered.

        :raises ValueError: the inputs cannot be encoded for the wire (nothing was sent).
        """
        ...

    def drop(self, worker: Worker, reason: str) -> None:
        """Let ``worker`` go (told DISCONNECT, reported lost, from the caller's stack)."""
        ...


class WorkerLink(BatchSink, Protocol):
    """What the dispatcher needs of the broker besides sending and dropping: its workers."""

    def workers(self) -> Iterator[Worker]: ...
