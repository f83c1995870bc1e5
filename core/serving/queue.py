"""Per-model-version queues: gather requests into batches and hand them to free workers.

One :class:`ModelQueue` per model version holds the requests waiting for a worker and the
batches each worker is computing. A worker announces how many batches it takes at once
(``capacity``); whenever one has room, the queue sends it everything waiting, up to the
model's ``max_batch_size``. So batches form by themselves under load and a lone request is
sent at once. A request larger than ``max_batch_size`` is split across batches and answered
when all its parts are back.

Batches go to a :class:`~ketch.serving.sink.BatchSink` (the broker). The queue tells its
:class:`PoolListener` (the pool manager) whenever what its pool needs may have changed: a
request found no worker, its load crossed a multiple of ``target_inflight``, or a worker or
process came or went. :class:`~ketch.serving.dispatcher.Dispatcher` places each worker in its
queue, and the broker hands that worker's replies to the queue itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ketch.observability.metrics import ModelMetrics
from ketch.observability.statistics import ModelStatistics
from ketch.serving import refusals
from ketch.serving.batching import batch_sizer
from ketch.serving.cache import PredictionCache
from ketch.serving.jobs import (
    Backoff,
    Binding,
    Deadline,
    Inputs,
    Job,
    Part,
    PredictionError,
    batch_inputs,
    take_batch,
    wait_until_woken,
    wake_all,
)
from ketch.serving.sink import BatchSink, PoolListener, ProcessKey, Worker
from ketch.serving.stalls import STALL_CHECK_S, Batch, StallWatch, WorkerSlot, pick_worker
from ketch.specs.models import ModelSpec, cache_limit
from ketch.types import Outputs
from ketch.zmq_transport.broker import RemoteError

if TYPE_CHECKING:
    from ketch.plugin_manager import Plugins

#: A batch is sent at most this many times: once, and once more if its worker dies.
MAX_ATTEMPTS = 2
#: Weight of the newest batch in the moving average of how fast a queue drains.
_RATE_SMOOTHING = 0.2
#: Answered requests per model version whose latency ``GET /models`` summarises.
LATENCIES_KEPT = 1000


log = logging.getLogger("ketch.queue")


class ModelQueue:
    """Requests and workers of one model version; see the module docstring."""

    def __init__(
        self,
        spec: ModelSpec,
        sink: BatchSink,
        batch_ids: Callable[[], int],
        metrics: ModelMetrics,
        observers: Plugins | None = None,
    ) -> None:
        self.spec = spec
        self._metrics = metrics
        #: Triton's statistics of this version (``GET /v2/models/stats``).
        self.statistics = ModelStatistics()
        #: The plugins told of each batch and request done (ketch_batch_done, ...).
        self._observers = observers
        self._sink = sink
        self._next_batch_id = batch_ids
        self._pending: deque[Part] = deque()
        self._workers: dict[bytes, WorkerSlot] = {}
        #: Processes started for this version that have not said READY yet.
        self._starting: set[ProcessKey] = set()
        self.served_from_file = False
        #: Why the model cannot be served at all (its workers cannot start).
        self.unhealthy_because: str | None = None
        #: Its workers are crash-looping: why, and when the next one may start. It serves
        #: with the workers it has; without any, it answers 503 until that attempt.
        self.backoff: Backoff | None = None
        self.worker_exits = 0
        self.last_error: str | None = None
        self.active_requests = 0
        self.last_request_at = -math.inf
        self.cold_starts = 0
        #: When the pending cold start began (the first worker's READY ends it); None: none.
        self._cold_start_began: float | None = None
        #: The pool manager, while it manages this version's pool.
        self._pool: PoolListener | None = None
        #: ``ceil(active_requests / target_inflight)`` when the pool was last told.
        self._load_level = 0
        self._cold_timer: asyncio.TimerHandle | None = None
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
        self.arrived = 0  # requests that reached it, refused ones too (a plan's tuner reads it)
        self.expired = 0
        self.last_batch_size = 0
        #: Seconds from arrival to answer of the last :data:`LATENCIES_KEPT` answered requests
        #: (the queue's part of a request: waiting, batching, computing; not the cache's).
        self._latencies: deque[float] = deque(maxlen=LATENCIES_KEPT)
        #: Why this version no longer takes requests (removed through the management API).
        self.removed_because: str | None = None
        #: The batch times a stall is measured against.
        self._stalls = StallWatch()
        self._stall_timer: asyncio.TimerHandle | None = None
        #: Futures of :meth:`wait_ready` and :meth:`wait_drained` callers.
        self._ready_waiters: list[asyncio.Future[None]] = []
        self._drain_waiters: list[asyncio.Future[None]] = []

    # -- requests ---------------------------------------------------------------------------

    def submit(
        self,
        inputs: Inputs,
        deadline: Deadline,
        params: dict[str, Any] | None = None,
        binding: Binding | None = None,
    ) -> asyncio.Future[Outputs]:
        """Queue a request's inputs (with its ``params``, for a model that takes them; a
        sequence step with its ``binding``); the future resolves to one output per input, or
        fails with a :class:`PredictionError` (429 when the queue is full, 504 at ``deadline``).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outputs] = loop.create_future()
        now = time.monotonic()
        job = Job(inputs, future, now, deadline, params, binding)
        self.arrived += 1
        if self.removed_because is not None:
            job.fail(refusals.removed(self.spec, self.removed_because))
            return future
        if self.unhealthy_because is not None:
            job.fail(refusals.unhealthy(self.spec, self.unhealthy_because))
            return future
        if self.abandoned:
            job.fail(refusals.no_worker(self.spec))
            return future
        backoff = self.backoff
        if backoff is not None and not self._workers and now < backoff.next_attempt_at:
            job.fail(refusals.backing_off(self.spec, backoff, now))
            return future
        if self._queued_items and self._queued_items + len(inputs) > self.spec.max_queue:
            self.rejected += 1
            job.fail(refusals.queue_full(self.spec, self._queued_items, self._drain_rate))
            return future
        self.active_requests += 1
        job.timer = loop.call_later(deadline.at - now, self._expire, job)
        future.add_done_callback(lambda _, job=job: self._job_done(job))  # type: ignore[misc]
        self.last_request_at = now
        self._enqueue(Part(job, 0, len(inputs)))
        if not self._workers:
            self._wait_for_cold_start(job, now)
        else:
            self._load_moved()
        self.pump()
        return future

    def _wait_for_cold_start(self, job: Job, now: float) -> None:
        """A request with no worker ready: it waits up to ``cold_start_timeout_s`` for one,
        and the first such request of a pool with none starting starts a cold start."""
        timeout_s = self.spec.pool.cold_start_timeout_s
        job.cold_deadline = now + timeout_s
        if self._cold_timer is None:
            self._cold_timer = asyncio.get_running_loop().call_later(
                timeout_s, self._expire_cold_starts
            )
        if not self._starting and self._pool is not None:
            self.cold_starts += 1
            self._cold_start_began = now
        self._load_moved(always=True)

    def _load_moved(self, *, always: bool = False) -> None:
        """Tell the pool when the load level (requests per ``target_inflight``) changed: the
        one load figure its size depends on, so the pool hears of load only when it matters."""
        level = -(-self.active_requests // self.spec.pool.target_inflight)
        if (always or level != self._load_level) and self._pool is not None:
            self._load_level = level
            self._pool.pool_changed(self)

    def managed_by(self, pool: PoolListener | None) -> None:
        """Let ``pool`` size this version's pool from now on (None: nobody does)."""
        self._pool = pool

    def _enqueue(self, part: Part, *, first: bool = False) -> None:
        if first:
            self._pending.appendleft(part)
        else:
            self._pending.append(part)
        part.job.queued += part.size
        self._queued_items += part.size

    def _job_done(self, job: Job) -> None:
        self.active_requests -= 1
        self._load_moved()
        self._queued_items -= job.queued
        job.queued = 0
        if job.timer is not None:
            job.timer.cancel()
        latency_s = time.monotonic() - job.arrived
        status = job.status()
        if status == 200:
            self._latencies.append(latency_s)
        self.statistics.request_done(status == 200, len(job.inputs), latency_s)
        if self._observers is not None:
            spec = self.spec
            self._observers.request_done(
                spec.name, spec.version, len(job.inputs), latency_s, status
            )
        if not self.active_requests:
            wake_all(self._drain_waiters)

    async def wait_drained(self, timeout_s: float) -> bool:
        """Wait until no request is queued or computing here; False if some still are after
        ``timeout_s`` (they are then left to finish or time out on their own)."""
        if not self.active_requests:
            return True
        return await wait_until_woken(self._drain_waiters, timeout_s)

    async def wait_ready(self, timeout_s: float) -> None:
        """Start a worker unless one is ready or starting, and wait for one to be ready.

        :raises PredictionError: 503 when the model is unhealthy or none is ready in time.
        """
        if self.unhealthy_because is not None:
            raise refusals.unhealthy(self.spec, self.unhealthy_because)
        if self._workers:
            return
        now = time.monotonic()
        if self.backoff is not None and now < self.backoff.next_attempt_at:
            raise refusals.backing_off(self.spec, self.backoff, now)
        # Counts as traffic for the pool manager: the pool wants a worker for idle_timeout_s.
        self.last_request_at = now
        self._load_moved(always=True)
        if not await wait_until_woken(self._ready_waiters, timeout_s):
            raise refusals.not_ready(self.spec, timeout_s, self.last_error)
        if self.unhealthy_because is not None:
            raise refusals.unhealthy(self.spec, self.unhealthy_because)
        if self.backoff is not None and not self._workers:
            raise refusals.backing_off(self.spec, self.backoff, time.monotonic())

    def reconfigure(self, spec: ModelSpec) -> None:
        """New settings for this version (pool, batching, resources): the pool follows them at
        once, the next batch takes the batch size and delay, workers started later the rest."""
        old, self.spec = self.spec, spec
        if (old.max_batch_size, old.max_delay_ms) != (spec.max_batch_size, spec.max_delay_ms):
            for slot in self._workers.values():
                slot.sizer = batch_sizer(spec)  # a new ceiling and target: adapt afresh
        self.pump()
        self._load_moved(always=True)

    def _expire(self, job: Job) -> None:
        if job.future.done():
            return
        self.expired += 1
        job.fail(refusals.deadline_passed(self.spec, job.deadline.budget_s, job.dispatched))

    def _expire_cold_starts(self) -> None:
        """Answer 503 to requests that waited their ``cold_start_timeout_s`` for a worker, and
        look again when the next waiting one's time is up."""
        self._cold_timer = None
        if self._workers or not self._pending:
            return
        now = time.monotonic()
        waiting = [(p, p.job.cold_deadline) for p in self._pending if p.job.cold_deadline]
        expired = [part for part, at in waiting if at <= now]
        if expired:
            error = refusals.no_cold_start(self.spec, bool(self._starting), self.last_error)
            for part in expired:
                part.job.fail(error)
        later = [at for _, at in waiting if at > now]
        if later:
            self._cold_timer = asyncio.get_running_loop().call_later(
                min(later) - now, self._expire_cold_starts
            )

    @property
    def abandoned(self) -> bool:
        """No worker serves this model and none will come by itself: it joined by hand only."""
        return not self.served_from_file and not self._workers and not self._starting

    def back_off(self, backoff: Backoff) -> None:
        """Its workers are crash-looping: without a worker, what waits is answered 503 now
        (with ``Retry-After``) rather than kept through attempts that keep failing; a request
        that comes once the next attempt is due waits for that attempt."""
        self.backoff = backoff
        self.last_error = backoff.cause
        if self._workers:
            return
        wake_all(self._ready_waiters)  # those waiting for a worker hear why none comes
        error = refusals.backing_off(self.spec, backoff, time.monotonic())
        while self._pending:
            self._pending.popleft().job.fail(error)
        self._load_moved(always=True)

    def mark_unhealthy(self, cause: str) -> None:
        """Stop serving: answer everything waiting, and every new request, 503 with ``cause``."""
        self.unhealthy_because = cause
        self.last_error = cause
        error = refusals.unhealthy(self.spec, cause)
        while self._pending:
            self._pending.popleft().job.fail(error)
        wake_all(self._ready_waiters)

    # -- the processes its pool started (from the supervisor, through the dispatcher) --------

    @property
    def starting(self) -> frozenset[ProcessKey]:
        """Processes started for this version that have not said READY yet."""
        return frozenset(self._starting)

    def process_started(self, process: ProcessKey) -> None:
        self._starting.add(process)

    def process_ready(self, process: ProcessKey) -> None:
        """``process`` said READY (its worker is added separately); nothing for a worker
        the pool did not start."""
        if process in self._starting:
            self._starting.discard(process)
            if self._pool is not None:
                self._pool.process_joined(process)

    def process_exited(self, process: ProcessKey, how: str, expected: bool) -> None:
        self._starting.discard(process)
        if not expected:
            self.worker_exits += 1
            self.last_error = how
        self._load_moved(always=True)

    def template_changed(self, template: dict[str, Any] | None) -> None:
        self.template = template
        if template is not None and template["state"] == "ready":
            self._load_moved(always=True)  # workers can start now

    @property
    def queue_depth(self) -> int:
        return self._queued_items

    def pump(self) -> None:
        """Send waiting inputs to every worker that has room: up to its batch size limit, and
        once ``max_delay_ms`` has passed for the oldest unless the batch is already full."""
        while self._pending:
            worker = pick_worker(self._workers.values())
            if worker is None:
                return
            limit = worker.sizer.limit if worker.sizer is not None else self.spec.batch_limit
            if self._should_wait(limit):
                return
            parts = take_batch(self._pending, limit)
            self._queued_items -= sum(part.size for part in parts)
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

    def _send(self, worker: WorkerSlot, parts: list[Part]) -> None:
        inputs = batch_inputs(parts)
        params = None
        if self.spec.takes_params:
            # Every input its request's parameters (none: an empty dict), in batch order.
            params = [part.job.params or {} for part in parts for _ in range(part.size)]
        batch_id = self._next_batch_id()
        try:
            delivered = self._sink.send_batch(worker.info, batch_id, inputs, params)
        except ValueError as exc:
            self._fail(parts, refusals.unsendable(self.spec, str(exc)))
            return
        if not delivered:
            # Never sent: the parts wait at the front for another worker (no attempt used),
            # and this one takes nothing more until its loss is reported.
            worker.unreachable = True
            for part in reversed(parts):
                self._enqueue(part, first=True)
            return
        sent_at = time.monotonic()
        for part in parts:
            part.attempts += 1
            if not part.job.dispatched:
                part.job.dispatched = True
                self.statistics.queued(sent_at - part.job.arrived)
        batch = Batch(batch_id, worker.info, parts, len(inputs), sent_at)
        worker.batches[batch.id] = batch
        worker.last_batch_id = batch_id
        self.last_batch_size = batch.size
        self._metrics.batch_sent(batch.size)
        if self._stall_timer is None:
            self._stall_timer = asyncio.get_running_loop().call_later(
                STALL_CHECK_S, self._look_for_stalls
            )

    # -- stalled batches --------------------------------------------------------------------

    def stall_after_s(self) -> float:
        """How long a worker may hold a batch before it is a stall (:class:`StallWatch`)."""
        return self._stalls.limit_s(self.spec.stall_timeout_s)

    def _look_for_stalls(self) -> None:
        self._stall_timer = None
        limit = self.stall_after_s()
        now = time.monotonic()
        for slot in list(self._workers.values()):
            self._check_worker(slot, limit, now)
        if any(slot.batches for slot in self._workers.values()):
            self._stall_timer = asyncio.get_running_loop().call_later(
                STALL_CHECK_S, self._look_for_stalls
            )

    def _check_worker(self, slot: WorkerSlot, limit: float, now: float) -> None:
        """Retry the batches ``slot`` has held past ``limit``; drop it if it keeps stalling."""
        stalled, drop_because = self._stalls.overdue(slot, limit, now)
        for batch, held in stalled:
            log.warning(
                "%s has held batch %d for %.1f s (a stall is %.1f s): retrying it elsewhere",
                slot.info.describe(),
                batch.id,
                held,
                limit,
            )
            self._retry_parts(batch.parts, slot.info, f"it stalled for {held:.1f} s")
        if drop_because is not None:
            self._sink.drop(slot.info, drop_because)
            if self._pool is not None:
                self._pool.process_stalled(slot.info, drop_because)
        self.pump()

    def _retry_parts(self, parts: list[Part], worker: Worker, reason: str) -> None:
        """Put ``parts`` back at the front for another worker, or fail those sent twice."""
        retry: list[Part] = []
        for part in parts:
            if part.job.future.done():
                continue
            if part.attempts >= MAX_ATTEMPTS:
                part.job.fail(
                    refusals.worker_lost(self.spec, worker.describe(), reason, part.attempts)
                )
            else:
                # A fresh part: the stalled batch keeps its own, whose late answer is ignored.
                retry.append(Part(part.job, part.start, part.stop, part.attempts))
        for part in reversed(retry):
            self._enqueue(part, first=True)

    # -- worker events ----------------------------------------------------------------------

    def add_worker(self, info: Worker) -> None:
        """A worker of this version said READY: it gets batches from now on, and the broker
        hands its replies straight to this queue."""
        info.receiver = self
        self.backoff = None  # a worker is up: whatever crashed may have healed
        self._workers[info.identity] = WorkerSlot(info, batch_sizer(self.spec))
        wake_all(self._ready_waiters)
        if self._cold_start_began is not None:
            self._metrics.cold_start_done(time.monotonic() - self._cold_start_began)
            self._cold_start_began = None
        self.pump()
        self._load_moved(always=True)

    def remove_worker(self, info: Worker, reason: str) -> None:
        worker = self._workers.pop(info.identity, None)
        if worker is None:
            return
        # Retries go first: they have waited longest. A stalled batch was retried already.
        for batch in worker.batches.values():
            if not batch.stalled:
                self._retry_parts(batch.parts, info, reason)
        if self.abandoned:
            error = refusals.no_worker(self.spec)
            while self._pending:
                self._pending.popleft().job.fail(error)
        self.pump()
        self._load_moved(always=True)

    def fail_in_flight(self, info: Worker, error: PredictionError) -> None:
        worker = self._workers.get(info.identity)
        if worker is None:
            return
        for batch in worker.batches.values():
            self._fail(batch.parts, error)
        worker.batches.clear()

    def batch_replied(
        self, info: Worker, batch_id: int, outputs: Outputs, compute_s: float | None = None
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
            self.statistics.batch_computed(batch.size, compute_s)
        worker = self._workers[info.identity]
        if worker.sizer is not None:
            worker.sizer.observe(batch.size, compute_s if compute_s else now - batch.sent_at)
        if self._last_completion > -math.inf:
            rate = batch.size / max(now - self._last_completion, 1e-6)
            self._drain_rate += _RATE_SMOOTHING * (rate - self._drain_rate)
        self._last_completion = now
        if len(outputs) != batch.size:
            error = refusals.wrong_output_count(
                self.spec, info.describe(), len(outputs), batch.size
            )
            self._fail(batch.parts, error)
        else:
            offset = 0
            for part in batch.parts:
                part.job.deliver(part.start, outputs[offset : offset + part.size])
                offset += part.size
        self.pump()

    def batch_failed(self, info: Worker, batch_id: int, remote: RemoteError) -> None:
        batch = self._finish(info, batch_id)
        if batch is None:
            return
        self._fail(batch.parts, refusals.batch_failed(self.spec, remote))
        self.pump()

    def _finish(self, info: Worker, batch_id: int) -> Batch | None:
        """The batch ``info`` answered, out of its worker's; None when its answer no longer
        matters (the worker left, or the batch stalled and was retried elsewhere)."""
        worker = self._workers.get(info.identity)
        if worker is None:
            return None
        batch = worker.batches.pop(batch_id, None)
        if batch is None:
            return None
        if batch.stalled:
            worker.stalled_batches -= 1
            self.pump()  # the worker takes batches again
            return None
        worker.stalls = 0
        self._stalls.observe(time.monotonic() - batch.sent_at)
        return batch

    def _fail(self, parts: list[Part], error: PredictionError) -> None:
        for part in parts:
            part.job.fail(error)

    def labels(self) -> dict[str, str]:
        """The ``model`` and ``version`` details every error about this queue carries."""
        return refusals.labels(self.spec)

    # -- status -----------------------------------------------------------------------------

    @property
    def ready_replicas(self) -> int:
        return len(self._workers)

    def holds_state(self, worker: bytes) -> bool:
        """Whether ``worker`` keeps state here that would be lost with it (sequences)."""
        return False

    def worker_slots(self) -> list[WorkerSlot]:
        """Its workers, with the batches each is computing (for status)."""
        return list(self._workers.values())

    def latencies(self) -> list[float]:
        """Seconds from arrival to answer of the last answered requests."""
        return list(self._latencies)
