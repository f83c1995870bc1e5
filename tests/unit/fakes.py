"""What surrounds the serving logic, in process: a batch sink in place of the broker, workers
that said READY, model specs, and a way to run an async test.

Every test builds its model specs with :func:`make_spec`, so a change of the spec type is one
change here.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import socket
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, ParamSpec

from ketch.observability.metrics import Metrics
from ketch.serving import status
from ketch.serving.jobs import Inputs
from ketch.serving.queue import ModelQueue
from ketch.serving.sink import Worker
from ketch.specs.models import ModelSpec, PoolSpec, WorkerStart, plain_data, validated_spec
from ketch.zmq_transport.broker import BatchReceiver, BrokerEvents, WorkerInfo
from ketch.zmq_transport.liveness import Heartbeat

P = ParamSpec("P")

#: The most any one unit test may take on its loop: it fails rather than hangs.
TEST_BOUND_S = 5.0
#: This machine, where a dispatcher's local workers run.
HOST = socket.gethostname()

_POOL_OPTIONS = frozenset(PoolSpec.__struct_fields__)
_START_OPTIONS = frozenset(WorkerStart.__struct_fields__)
_worker_numbers = itertools.count(1)


def make_spec(**overrides: Any) -> ModelSpec:
    """A model spec (``m:1`` unless ``name``/``version`` say otherwise) with the options
    ``@ketch.model`` takes, flat as it takes them (``max_replicas=3``, ``preload=True``)."""
    pool = {key: overrides.pop(key) for key in list(overrides) if key in _POOL_OPTIONS}
    start = {key: overrides.pop(key) for key in list(overrides) if key in _START_OPTIONS}
    if pool:
        overrides["pool"] = PoolSpec(**pool)
    if start:
        overrides["start"] = WorkerStart(**start)
    return validated_spec(**{"name": "m", **overrides})


def make_worker(
    spec: ModelSpec,
    *,
    capacity: int = 1,
    pid: int | None = None,
    host: str = HOST,
    heartbeat: Heartbeat | None = None,
    launch: str | None = None,
) -> Worker:
    """A worker of ``spec`` as the broker registers it from a READY (a local one by default;
    ``launch``: the id its pool started it with, None for one started by hand)."""
    number = next(_worker_numbers)
    return WorkerInfo(
        f"worker-{number}".encode(),
        spec,
        pid if pid is not None else 40_000 + number,
        host,
        capacity,
        heartbeat or Heartbeat(),
        launch=launch,
    )


@dataclass(frozen=True, slots=True)
class Sent:
    """One batch handed to the sink."""

    worker: Worker
    batch_id: int
    inputs: Inputs
    #: Each input's request parameters, sent for a model that takes them.
    params: list[dict[str, Any]] | None = None


class FakeSink:
    """A :class:`~ketch.serving.sink.WorkerLink` that records batches instead of sending them.

    Like the broker, it reports to ``events`` (the dispatcher, when given): :meth:`join` is a
    READY, :meth:`drop` tells the worker to leave and reports it lost, and a send it refuses
    answers False while the loss of that worker (if it had joined) is reported from the loop
    afterwards. ``on_send`` is called with each batch delivered (to answer it, say).
    """

    def __init__(self, events: BrokerEvents[ModelSpec] | None = None) -> None:
        self.events = events
        self.on_send: Callable[[Sent], None] | None = None
        self.sent: list[Sent] = []
        self.refused: list[Sent] = []
        self.dropped: list[tuple[Worker, str]] = []
        self.refused_ready: list[tuple[Worker, str]] = []
        self._workers: dict[bytes, Worker] = {}
        self._refusing: set[bytes] = set()
        self._unencodable: dict[bytes, str] = {}
        self._waiters: list[asyncio.Future[None]] = []

    # -- what a test tells it ----------------------------------------------------------------

    def join(self, worker: Worker) -> Worker:
        """``worker`` says READY: registered unless ``events`` refuses it (then recorded in
        :attr:`refused_ready` with the reason)."""
        if self.events is not None:
            refusal = self.events.admit(worker)
            if refusal is not None:
                self.refused_ready.append((worker, refusal))
                return worker
        self._workers[worker.identity] = worker
        if self.events is not None:
            self.events.worker_ready(worker)
        return worker

    def refuse(self, worker: Worker) -> None:
        """From now on, sends to ``worker`` cannot be delivered (its connection is gone)."""
        self._refusing.add(worker.identity)

    def cannot_encode(self, worker: Worker, why: str) -> None:
        """From now on, sends to ``worker`` raise ``ValueError(why)``."""
        self._unencodable[worker.identity] = why

    # -- what a test reads -------------------------------------------------------------------

    def sent_to(self, worker: Worker) -> list[Sent]:
        return [batch for batch in self.sent if batch.worker is worker]

    def sizes(self) -> list[int]:
        return [len(batch.inputs) for batch in self.sent]

    async def wait_for_batches(self, count: int, timeout_s: float = 1.0) -> list[Sent]:
        """The batches sent, once there are at least ``count``; fails after ``timeout_s``."""
        await self._wait_until(lambda: len(self.sent) >= count, timeout_s)
        return self.sent

    async def wait_for_drops(self, count: int, timeout_s: float = 1.0) -> list[tuple[Worker, str]]:
        """The workers dropped, once there are at least ``count``; fails after ``timeout_s``."""
        await self._wait_until(lambda: len(self.dropped) >= count, timeout_s)
        return self.dropped

    async def _wait_until(self, done: Callable[[], bool], timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while not done():
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter

    def _changed(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    # -- the WorkerLink protocol -------------------------------------------------------------

    def send_batch(
        self,
        worker: Worker,
        batch_id: int,
        inputs: Inputs,
        params: list[dict[str, Any]] | None = None,
    ) -> bool:
        why = self._unencodable.get(worker.identity)
        if why is not None:
            raise ValueError(why)
        batch = Sent(worker, batch_id, inputs, params)
        if worker.identity in self._refusing:
            self.refused.append(batch)
            if worker.identity in self._workers:
                # As the broker does: reported from the loop, never from inside the send.
                asyncio.get_running_loop().call_soon(self.drop, worker, "cannot deliver to it")
            return False
        self.sent.append(batch)
        self._changed()
        if self.on_send is not None:
            self.on_send(batch)
        return True

    def workers(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def drop(self, worker: Worker, reason: str) -> None:
        if self._workers.pop(worker.identity, None) is None:
            return
        self.dropped.append((worker, reason))
        self._changed()
        if self.events is not None:
            self.events.worker_lost(worker, reason)


def batches_counted(metrics: Metrics, spec: ModelSpec) -> tuple[float, float]:
    """``(batches, inputs)`` that ``ketch_batch_size`` counted as sent for ``spec``."""
    labels = {"model": spec.name, "version": spec.version}
    count = metrics.registry.get_sample_value("ketch_batch_size_count", labels)
    total = metrics.registry.get_sample_value("ketch_batch_size_sum", labels)
    return (count or 0.0, total or 0.0)


def in_loop(
    test: Callable[P, Coroutine[Any, Any, None]],
) -> Callable[P, None]:
    """Run an async test function on a fresh event loop, failing it after
    :data:`TEST_BOUND_S` rather than letting it hang."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        async def bounded() -> None:
            await asyncio.wait_for(test(*args, **kwargs), TEST_BOUND_S)

        asyncio.run(bounded())

    return run


def described(queue: ModelQueue, default_version: str = "1") -> dict[str, Any]:
    """The queue as ``GET /models`` shows it, as plain JSON data."""
    return plain_data(status.describe(queue, default_version))


def receiver_of(worker: Worker) -> BatchReceiver[ModelSpec]:
    """Where the broker hands this worker's REPLY and ERROR: the queue that placed it."""
    assert worker.receiver is not None, f"{worker.describe()} was never placed in a queue"
    receiver: BatchReceiver[ModelSpec] = worker.receiver
    return receiver
