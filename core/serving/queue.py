"""Per-model-version queues: gather requests into batches and hand them to free workers.

One :class:`ModelQueue` per model version holds the requests waiting for a worker and the
batches each worker is computing. A worker announces how many batches it takes at once
(``capacity``); whenever one has room, the queue sends it everything waiting, up to the
model's ``max_batch_size``. So batches form by themselves under load and a lone request is
sent at once. A request larger than ``max_batch_size`` is split across batches and answered
when all its parts are back.

:class:`~ketch.serving.dispatcher.Dispatcher` routes the broker's events to the right queue.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ketch.observability.metrics import ModelMetrics
from ketch.serving.batching import BatchSizer, batch_latency_target_s
from ketch.serving.cache import PredictionCache
from ketch.serving.jobs import Inputs, Job, Part, PredictionError
from ketch.specs.models import ModelSpec, PoolSpec, cache_limit
from ketch.types import Outputs
from ketch.zmq_transport.broker import Broker, RemoteError, WorkerInfo
from ketch.zmq_transport.protocol import ErrorKind

if TYPE_CHECKING:
    from ketch.plugin_manager import Plugins

#: A batch is sent at most this many times: once, and once more if its worker dies.
MAX_ATTEMPTS = 2
#: Weight of the newest batch in the moving average of how fast a queue drains.
_RATE_SMOOTHING = 0.2
#: Incompatible (differently shaped) parts a batch looks past before it is sent as it is.
_SCAN_AHEAD = 64
#: Answered requests per model version whose latency ``GET /models`` summarises.
LATENCIES_KEPT = 1000


@dataclass(slots=True)
class Batch:
    id: int
    worker: WorkerInfo
    parts: list[Part]
    size: int
    sent_at: float


@dataclass(slots=True)
class _Worker:
    info: WorkerInfo
    #: Adapts this worker's batch size to the model's ``slo_ms``; None without one.
    sizer: BatchSizer | None
    batches: dict[int, Batch] = field(default_factory=dict)

    @property
    def has_room(self) -> bool:
        return len(self.batches) < self.info.capacity


class ModelQueue:
    """Requests and workers of one model version; see the module docstring."""

    def __init__(
        self,
        spec: ModelSpec,
        broker: Broker,
        batch_ids: Callable[[], int],
        metrics: ModelMetrics,
        observers: Plugins | None = None,
    ) -> None:
        self.spec = spec
        self._metrics = metrics
        #: The plugins told of each batch and request done (ketch_batch_done, ...).
        self._observers = observers
        self._broker = broker
        self._next_batch_id = batch_ids
        self._pending: deque[Part] = deque()
        self._workers: dict[bytes, _Worker] = {}
        self.starting: set[int] = set()
        self.served_from_file = False
        #: Why the model stopped being served; set once its workers crash-looped.
        self.unhealthy_because: str | None = None
        self.worker_exits = 0
        self.last_error: str | None = None
        self.active_requests = 0
        self.last_request_at = -math.inf
        self.cold_starts = 0
        #: When the pending cold start began (the first worker's READY ends it); None: none.
        self._cold_start_began: float | None = None
        #: Called when a request finds no worker ready or starting (the pool manager's cue).
        self.on_demand: Callable[[], None] | None = None
        #: A ``preload=True`` model's template process (pid, state, memory), while it runs.
        self.template: dict[str, Any] | None = None
        limit = cache_limit(spec.cache_size, spec.name)
        self.cache = PredictionCache(*limit) if limit is not None else None
        #: Inputs waiting for a worker, from requests still waiting for their answer.
        self._queued_items = 0
        #: Inputs answered per second, smoothed: how soon a full queue has room again.
        self._drain_rate = 0.0
        self._last_completion = -math.inf
        self._delay_timer: asyncio.TimerHandle | None = None
        self.rejected = 0
        self.expired = 0
        self.last_batch_size = 0
        #: Seconds from arrival to answer of the last :data:`LATENCIES_KEPT` answered requests
        #: (the queue's part of a request: waiting, batching, computing; not the cache's).
        self._latencies: deque[float] = deque(maxlen=LATENCIES_KEPT)
        #: Why this version no longer takes requests (removed through the management API).
        self.removed_because: str | None = None
        #: Futures of :meth:`wait_ready` and :meth:`wait_drained` callers.
        self._ready_waiters: list[asyncio.Future[None]] = []
        self._drain_waiters: list[asyncio.Future[None]] = []

    # -- requests ---------------------------------------------------------------------------

    def submit(self, inputs: Inputs, timeout_s: float) -> asyncio.Future[Outputs]:
        """Queue a request's inputs; the future resolves to one output per input, or fails
        with a :class:`PredictionError` (429 when the queue is full, 504 after ``timeout_s``).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outputs] = loop.create_future()
        now = time.monotonic()
        job = Job(inputs, future, now, now + timeout_s)
        if self.removed_because is not None:
            job.fail(PredictionError(404, self.removed_because, **self.labels()))
            return future
        if self.unhealthy_because is not None:
            job.fail(self._unhealthy_error())
            return future
        if self._abandoned():
            job.fail(self._no_worker_error())
            return future
        if self._queued_items and self._queued_items + len(inputs) > self.spec.max_queue:
            self.rejected += 1
            job.fail(self._queue_full_error())
            return future
        self.active_requests += 1
        job.timer = loop.call_later(timeout_s, self._expire, job, timeout_s)
        future.add_done_callback(lambda _, job=job: self._job_done(job))  # type: ignore[misc]
        self.last_request_at = now
        self._enqueue(Part(job, 0, len(inputs)))
        if not self._workers:
            job.cold_deadline = now + self.spec.pool.cold_start_timeout_s
            if not self.starting and self.on_demand is not None:
                self.cold_starts += 1
                self._cold_start_began = now
                self.on_demand()
        self.pump()
        return future

    def _enqueue(self, part: Part, *, first: bool = False) -> None:
        if first:
            self._pending.appendleft(part)
        else:
            self._pending.append(part)
        part.job.queued += part.size
        self._queued_items += part.size

    def _job_done(self, job: Job) -> None:
        self.active_requests -= 1
        self._queued_items -= job.queued
        job.queued = 0
        if job.timer is not None:
            job.timer.cancel()
        latency_s = time.monotonic() - job.arrived
        status = job.status()
        if status == 200:
            self._latencies.append(latency_s)
        if self._observers is not None:
            spec = self.spec
            self._observers.request_done(
                spec.name, spec.version, len(job.inputs), latency_s, status
            )
        if not self.active_requests:
            _wake(self._drain_waiters)

    async def wait_drained(self, timeout_s: float) -> bool:
        """Wait until no request is queued or computing here; False if some still are after
        ``timeout_s`` (they are then left to finish or time out on their own)."""
        if not self.active_requests:
            return True
        return await _wait_for(self._drain_waiters, timeout_s)

    async def wait_ready(self, timeout_s: float) -> None:
        """Start a worker unless one is ready or starting, and wait for one to be ready.

        :raises PredictionError: 503 when the model is unhealthy or none is ready in time.
        """
        if self.unhealthy_because is not None:
            raise self._unhealthy_error()
        if self._workers:
            return
        # Counts as traffic for the pool manager: the pool wants a worker for idle_timeout_s.
        self.last_request_at = time.monotonic()
        if not self.starting and self.on_demand is not None:
            self.on_demand()
        if not await _wait_for(self._ready_waiters, timeout_s):
            cause = f"; the last attempt: {self.last_error}" if self.last_error else ""
            raise PredictionError(
                503,
                f"model {self.spec.label()!r} has no worker ready after {timeout_s:g} s{cause}",
                **self.labels(),
            )
        if self.unhealthy_because is not None:
            raise self._unhealthy_error()

    def set_pool(self, pool: PoolSpec) -> None:
        """New replica bounds (or timings); the pool manager follows them at its next tick."""
        self.spec = replace(self.spec, pool=pool)

    def _expire(self, job: Job, timeout_s: float) -> None:
        if job.future.done():
            return
        self.expired += 1
        where = (
            "while its batch was computing"
            if job.dispatched
            else "before a worker was free, so it was never computed"
        )
        job.fail(
            PredictionError(
                504,
                f"model {self.spec.label()!r} did not answer within {timeout_s * 1000:g} ms: "
                f"the request's deadline passed {where}",
                **self.labels(),
            )
        )

    def _queue_full_error(self) -> PredictionError:
        retry_after = 1
        if self._drain_rate > 0:
            retry_after = max(1, min(60, math.ceil(self._queued_items / self._drain_rate)))
        error = PredictionError(
            429,
            f"model {self.spec.label()!r} has {self._queued_items} inputs waiting, its "
            f"max_queue is {self.spec.max_queue}: retry after {retry_after} s",
            **self.labels(),
        )
        error.headers["Retry-After"] = str(retry_after)
        return error

    def expire_cold_starts(self, now: float) -> None:
        """Answer 503 to requests that waited their ``cold_start_timeout_s`` for a worker."""
        if self._workers or not self._pending:
            return
        expired = [
            p
            for p in self._pending
            if p.job.cold_deadline is not None and p.job.cold_deadline < now
        ]
        if not expired:
            return
        cause = "a worker is still starting" if self.starting else "no worker could start"
        if self.last_error is not None:
            cause = f"{cause}; the last attempt: {self.last_error}"
        error = PredictionError(
            503,
            f"model {self.spec.label()!r} got no worker within "
            f"{self.spec.pool.cold_start_timeout_s:g} s ({cause})",
            **self.labels(),
        )
        for part in expired:
            part.job.fail(error)

    def idle_workers(self, count: int, local_pids: set[int]) -> list[WorkerInfo]:
        """Up to ``count`` local workers with no batch in flight, to be scaled down."""
        hostname = socket.gethostname()
        idle = [
            w.info
            for w in self._workers.values()
            if not w.batches and w.info.pid in local_pids and w.info.host == hostname
        ]
        return idle[:count]

    def _abandoned(self) -> bool:
        """No worker serves this model and none will come by itself: it joined by hand only."""
        return not self.served_from_file and not self._workers and not self.starting

    def mark_unhealthy(self, cause: str) -> None:
        """Stop serving: answer everything waiting, and every new request, 503 with ``cause``."""
        self.unhealthy_because = cause
        self.last_error = cause
        error = self._unhealthy_error()
        while self._pending:
            self._pending.popleft().job.fail(error)
        _wake(self._ready_waiters)

    def _unhealthy_error(self) -> PredictionError:
        return PredictionError(
            503,
            f"model {self.spec.label()!r} is unhealthy and no longer served: "
            f"{self.unhealthy_because}; fix it and restart ketch (or remove it and add it "
            "again through the management API)",
            **self.labels(),
        )

    def _no_worker_error(self) -> PredictionError:
        return PredictionError(
            503,
            f"no worker serves model {self.spec.label()!r}: its workers were started by hand "
            "and have all left; start one with `ketch worker`",
            **self.labels(),
        )

    @property
    def queue_depth(self) -> int:
        return self._queued_items

    def pump(self) -> None:
        """Send waiting inputs to every worker that has room: up to its batch size limit, and
        once ``max_delay_ms`` has passed for the oldest unless the batch is already full."""
        while self._pending:
            worker = next((w for w in self._workers.values() if w.has_room), None)
            if worker is None:
                return
            limit = worker.sizer.limit if worker.sizer is not None else self.spec.max_batch_size
            if self._should_wait(limit):
                return
            parts = self._take(limit)
            if not parts:
                return
            self._send(worker, parts)

    def _should_wait(self, limit: int) -> bool:
        """Whether to hold a batch smaller than ``limit`` for more inputs (``max_delay_ms``);
        if so, a timer pumps again when the oldest input has waited long enough."""
        if self.spec.max_delay_ms <= 0 or self._queued_items >= limit:
            return False
        send_at = self._pending[0].job.arrived + self.spec.max_delay_ms / 1000
        wait_s = send_at - time.monotonic()
        if wait_s <= 0:
            return False
        if self._delay_timer is None or self._delay_timer.cancelled():
            self._delay_timer = asyncio.get_running_loop().call_later(wait_s, self._delay_over)
        return True

    def _delay_over(self) -> None:
        self._delay_timer = None
        self.pump()

    def _take(self, limit: int) -> list[Part]:
        """Up to ``limit`` waiting inputs, oldest first; for numpy models, only inputs of the
        first one's shape (the others wait for a batch of their own shape)."""
        parts: list[Part] = []
        skipped: list[Part] = []
        room = limit
        shape: tuple[int, ...] | None = None
        while self._pending and room and len(skipped) < _SCAN_AHEAD:
            part = self._pending.popleft()
            if part.job.future.done():
                continue  # timed out, or failed through another part: no longer counted
            if parts and part.item_shape() != shape:
                skipped.append(part)
                continue
            shape = part.item_shape()
            if part.size > room:
                rest = Part(part.job, part.start + room, part.stop, part.attempts)
                self._pending.appendleft(rest)
                part = Part(part.job, part.start, part.start + room, part.attempts)
            part.job.queued -= part.size
            self._queued_items -= part.size
            parts.append(part)
            room -= part.size
        self._pending.extendleft(reversed(skipped))
        return parts

    def _send(self, worker: _Worker, parts: list[Part]) -> None:
        first = parts[0]
        if len(parts) == 1 and first.size == len(first.job.inputs):
            inputs: Inputs = first.job.inputs
        elif isinstance(first.job.inputs, np.ndarray):
            inputs = np.concatenate([part.inputs() for part in parts])
        else:
            inputs = [x for part in parts for x in part.inputs()]
        for part in parts:
            part.attempts += 1
            part.job.dispatched = True
        batch = Batch(self._next_batch_id(), worker.info, parts, len(inputs), time.monotonic())
        worker.batches[batch.id] = batch
        self.last_batch_size = batch.size
        try:
            # On failure the broker drops the worker, and worker_lost requeues this batch.
            self._broker.send_batch(worker.info, batch.id, inputs)
        except ValueError as exc:
            worker.batches.pop(batch.id, None)
            self._fail(parts, PredictionError(400, str(exc), **self.labels()))
        else:
            self._metrics.batch_sent(batch.size)

    # -- worker events ----------------------------------------------------------------------

    def learn_loaded(self, announced: ModelSpec) -> None:
        """Take what a worker's runtime found (the tensors, so requests are checked against
        them, and what it says of the model)."""
        learnt = (announced.inputs, announced.outputs, announced.runtime_info)
        if learnt != (self.spec.inputs, self.spec.outputs, self.spec.runtime_info):
            self.spec = replace(
                self.spec,
                inputs=announced.inputs,
                outputs=announced.outputs,
                runtime_info=announced.runtime_info,
            )

    def add_worker(self, info: WorkerInfo) -> None:
        sizer = None
        if self.spec.slo_ms is not None:
            target_s = batch_latency_target_s(self.spec.slo_ms, self.spec.max_delay_ms)
            sizer = BatchSizer(target_s, self.spec.max_batch_size)
        self._workers[info.identity] = _Worker(info, sizer)
        _wake(self._ready_waiters)
        if self._cold_start_began is not None:
            self._metrics.cold_start_done(time.monotonic() - self._cold_start_began)
            self._cold_start_began = None
        self.pump()

    def remove_worker(self, info: WorkerInfo, reason: str) -> None:
        worker = self._workers.pop(info.identity, None)
        if worker is None:
            return
        retry: list[Part] = []
        for batch in worker.batches.values():
            for part in batch.parts:
                if part.job.future.done():
                    continue
                if part.attempts >= MAX_ATTEMPTS:
                    part.job.fail(
                        PredictionError(
                            503,
                            f"{info.describe()} was lost while computing this request "
                            f"({reason}), after {part.attempts} attempts",
                            **self.labels(),
                        )
                    )
                else:
                    retry.append(part)
        # Retries go first: they have waited longest.
        for part in reversed(retry):
            self._enqueue(part, first=True)
        if self._abandoned():
            error = self._no_worker_error()
            while self._pending:
                self._pending.popleft().job.fail(error)
        self.pump()

    def fail_in_flight(self, info: WorkerInfo, error: PredictionError) -> None:
        worker = self._workers.get(info.identity)
        if worker is None:
            return
        for batch in worker.batches.values():
            self._fail(batch.parts, error)
        worker.batches.clear()

    def complete(
        self, info: WorkerInfo, batch_id: int, outputs: Outputs, compute_s: float | None = None
    ) -> None:
        """A batch came back: deliver its outputs; ``compute_s`` is the model's time on it as
        the worker measured it (the round trip when unknown), which the batch size tunes by:
        a busy gateway's own delays must not shrink the workers' batches."""
        batch = self._finish(info, batch_id)
        if batch is None:
            return
        if self._observers is not None:
            spec = self.spec
            self._observers.batch_done(spec.name, spec.version, batch.size, compute_s, info.pid)
        now = time.monotonic()
        if compute_s is not None:
            self._metrics.batch_computed(compute_s)
        worker = self._workers[info.identity]
        if worker.sizer is not None:
            worker.sizer.observe(batch.size, compute_s if compute_s else now - batch.sent_at)
        if self._last_completion > -math.inf:
            rate = batch.size / max(now - self._last_completion, 1e-6)
            self._drain_rate += _RATE_SMOOTHING * (rate - self._drain_rate)
        self._last_completion = now
        if len(outputs) != batch.size:
            error = PredictionError(
                500,
                f"{info.describe()} returned {len(outputs)} outputs for a batch of {batch.size}",
                **self.labels(),
            )
            self._fail(batch.parts, error)
        else:
            offset = 0
            for part in batch.parts:
                part.job.deliver(part.start, outputs[offset : offset + part.size])
                offset += part.size
        self.pump()

    def fail_batch(self, info: WorkerInfo, batch_id: int, remote: RemoteError) -> None:
        batch = self._finish(info, batch_id)
        if batch is None:
            return
        if remote.kind is ErrorKind.MODEL:
            error = PredictionError(
                500,
                f"model {self.spec.label()!r} raised {remote.type}: {remote.message}",
                type=remote.type,
                message=remote.message,
                **self.labels(),
            )
        else:
            status = 400 if remote.kind is ErrorKind.BAD_INPUT else 500
            error = PredictionError(status, remote.message, type=remote.type, **self.labels())
        self._fail(batch.parts, error)
        self.pump()

    def _finish(self, info: WorkerInfo, batch_id: int) -> Batch | None:
        worker = self._workers.get(info.identity)
        return None if worker is None else worker.batches.pop(batch_id, None)

    def _fail(self, parts: list[Part], error: PredictionError) -> None:
        for part in parts:
            part.job.fail(error)

    def labels(self) -> dict[str, str]:
        """The ``model`` and ``version`` details every error about this queue carries."""
        return {"model": self.spec.name, "version": self.spec.version}

    # -- status -----------------------------------------------------------------------------

    @property
    def ready_replicas(self) -> int:
        return len(self._workers)

    @property
    def state(self) -> str:
        if self.unhealthy_because is not None:
            return "unhealthy"
        if self._workers:
            return "ready"
        if self.starting:
            return "starting"
        return "zero" if self.served_from_file else "unavailable"

    @property
    def ready_to_serve(self) -> bool:
        """Can answer now, or by a cold start: what readiness probes and ``ketch: ready`` mean."""
        if self.unhealthy_because is not None:
            return False
        return self.spec.pool.min_replicas == 0 or bool(self._workers)

    def describe(self, default_version: str) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "version": self.spec.version,
            "default": self.spec.version == default_version,
            "state": self.state,
            "replicas": {"ready": len(self._workers), "starting": len(self.starting)},
            "runtime": self.spec.runtime,
            "artifact": self.spec.artifact,
            "options": self.spec.options,
            "inputs": [t.to_dict() for t in self.spec.inputs],
            "outputs": [t.to_dict() for t in self.spec.outputs],
            "runtime_info": self.spec.runtime_info,
            "max_batch_size": self.spec.max_batch_size,
            "batch_input": self.spec.batch_input,
            "batching": {
                "max_delay_ms": self.spec.max_delay_ms,
                "slo_ms": self.spec.slo_ms,
                "max_queue": self.spec.max_queue,
                "last_batch_size": self.last_batch_size,
            },
            "latency_ms": self._latency_ms(),
            "queue_depth": self.queue_depth,
            "in_flight": sum(b.size for w in self._workers.values() for b in w.batches.values()),
            "active_requests": self.active_requests,
            "rejected": self.rejected,
            "expired": self.expired,
            "cache": self.cache.describe() if self.cache is not None else None,
            "cold_starts": self.cold_starts,
            "worker_exits": self.worker_exits,
            "last_error": self.last_error,
            "pool": asdict(self.spec.pool),
            "resources": asdict(self.spec.resources),
            "start": asdict(self.spec.start),
            "template": self.template,
            "workers": [
                {
                    "pid": w.info.pid,
                    "host": w.info.host,
                    "capacity": w.info.capacity,
                    "batches_in_flight": len(w.batches),
                    "batch_limit": (
                        w.sizer.limit if w.sizer is not None else self.spec.max_batch_size
                    ),
                }
                for w in self._workers.values()
            ],
        }

    def _latency_ms(self) -> dict[str, Any]:
        """Percentiles of the recent requests' latency, in ms (None before any answer)."""
        if not self._latencies:
            return {"requests": 0, "p50": None, "p90": None, "p99": None}
        ms = np.percentile(np.fromiter(self._latencies, float), (50, 90, 99)) * 1000
        return {
            "requests": len(self._latencies),
            **{key: round(float(v), 3) for key, v in zip(("p50", "p90", "p99"), ms, strict=True)},
        }


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)
    waiters.clear()


async def _wait_for(waiters: list[asyncio.Future[None]], timeout_s: float) -> bool:
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
