"""The pool manager: how many local workers each model version runs, from its load.

A pool grows at once when its load asks for more workers (a request to a pool at zero starts
one immediately) and shrinks only after it has had more workers than it needs for
``idle_timeout_s``: that delay is the hysteresis that keeps a pool from flapping. After
``idle_timeout_s`` without any request, a pool with ``min_replicas=0`` is back to zero
processes. The decision itself is :func:`scale_step`, a pure function. A pool a plan sized
(``ketch serve --plan``) also follows its tuner (:mod:`ketch.planning.tuner`): it runs at
least the replicas the tuner asks for from its arrival envelope, within ``max_replicas``.
When a version's resources change while it runs (a plan applied through the management API),
its pool renews its workers: each one started before is replaced by one started with the new
resources, and leaves once it is idle and its replacement is ready, so capacity never drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Protocol

from ketch.planning.tuner import SAMPLE_S, Tuner
from ketch.pools.supervisor import WorkerProcesses
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.queue import ModelQueue
from ketch.serving.sink import ProcessKey, Worker, process_of
from ketch.serving.stalls import WorkerSlot
from ketch.serving.status import idle_started_workers
from ketch.specs.models import ModelSpec, PoolSpec

#: How often workers' resident memory is compared with their model's ``memory_mb``.
MEMORY_CHECK_S = 0.1
#: Added to a pool's timer so that the moment it waits for has surely passed when it fires.
_TIMER_SLACK_S = 0.001


@dataclass(frozen=True, slots=True)
class RemoteLoad:
    """Another gateway's load on one pool, as this one last heard it."""

    active: int
    #: When its last request arrived, on this gateway's clock (``time.monotonic()``).
    last_request_at: float


class LoadSharing(Protocol):
    """How a gateway that does not run the pools' scaling shares its load with the one that
    does (:mod:`ketch.pools.gateways`)."""

    def report(self, queue: ModelQueue) -> None:
        """``queue``'s load may have changed: tell the gateway that scales its pool."""


@dataclass(slots=True)
class ScaleState:
    """What :func:`scale_step` remembers between calls for one pool."""

    #: Since when the pool has had more workers than its load needs (None: it has not).
    surplus_since: float | None = None


def desired_replicas(spec: PoolSpec, active: int, idle_s: float) -> int:
    """Workers wanted for ``active`` requests (queued or computing), ``idle_s`` seconds after
    the last request arrived."""
    wanted = math.ceil(active / spec.target_inflight)
    if idle_s < spec.idle_timeout_s:
        wanted = max(wanted, 1)  # recent traffic keeps a worker warm between requests
    return max(spec.min_replicas, min(spec.max_replicas, wanted))


def scale_step(
    spec: PoolSpec,
    current: int,
    active: int,
    idle_s: float,
    now: float,
    state: ScaleState,
    tuned: int = 0,
) -> int:
    """Workers to start (> 0) or stop (< 0) now, for a pool of ``current`` workers; ``tuned``:
    the replicas a plan's tuner asks for (at least that many, within ``max_replicas``)."""
    if current > spec.max_replicas:
        # Over its bound, which only a worker started by hand can bring (it joined while the
        # pool's own were up or starting): the bound holds now, not after an idle period.
        state.surplus_since = now
        return spec.max_replicas - current
    desired = max(desired_replicas(spec, active, idle_s), min(tuned, spec.max_replicas))
    if desired >= current:
        state.surplus_since = None
        return desired - current
    if state.surplus_since is None:
        state.surplus_since = now
        return 0
    if now - state.surplus_since < spec.idle_timeout_s:
        return 0
    state.surplus_since = now
    # Without traffic, go straight to the floor; under load, shed one worker per period.
    return desired - current if active == 0 else -1


def _why_fewer(pool: PoolSpec, current: int) -> str:
    """What a scale-down says of itself in the lost-worker line."""
    if current > pool.max_replicas:
        return (
            f"scaled down: {current} workers with those started by hand, over "
            f"max_replicas={pool.max_replicas}"
        )
    return f"scaled down after {pool.idle_timeout_s:g} s with more workers than load"


class PoolManager:
    """Sizes every managed pool from its load, when something happens rather than on a tick.

    A queue tells the manager when its pool's needs may have changed (:class:`PoolListener`):
    a request found no worker, the load crossed a multiple of ``target_inflight``, a worker or
    a process came or went, the bounds changed. The only waits are timers for what changes by
    itself with time: the end of an idle period (scale down, or back to zero), and the end of a
    crash back-off. Memory caps are the one thing sampled (:data:`MEMORY_CHECK_S`), since no
    event says a process grew.
    """

    def __init__(self, dispatcher: Dispatcher, workers: WorkerProcesses) -> None:
        self._dispatcher = dispatcher
        self._workers = workers
        self._states: dict[tuple[str, str], ScaleState] = {}
        self._queues: dict[tuple[str, str], ModelQueue] = {}
        #: Whether this gateway runs its pools' scaling: always, unless it shares its pools
        #: with other gateways, where only the one holding the lease does.
        self.leading = True
        self._sharing: LoadSharing | None = None
        #: The other gateways' load on each pool (when this one leads them).
        self._remote: dict[tuple[str, str], dict[str, RemoteLoad]] = {}
        #: Each pool's pending look-again: when (``time.monotonic()``) and its timer.
        self._timers: dict[tuple[str, str], tuple[float, asyncio.TimerHandle]] = {}
        self._memory_task: asyncio.Task[None] | None = None
        #: The tuners of the pools a plan sized.
        self._tuners: dict[tuple[str, str], Tuner] = {}
        #: Per pool being renewed: the processes started before its resources changed.
        self._stale: dict[tuple[str, str], set[ProcessKey]] = {}
        #: The task that samples tuned and renewing pools, while there are any.
        self._sampling: asyncio.Task[None] | None = None
        self._running = False

    def manage(self, spec: ModelSpec) -> None:
        queue = self._dispatcher.add_model(spec)
        self._states[spec.key] = ScaleState()
        self._queues[spec.key] = queue
        queue.managed_by(self)
        if self.leading:
            self._workers.prepare(spec)
        self.pool_changed(queue)

    # -- pools shared by several gateways (ketch.pools.gateways) ------------------------------

    def share_load(self, sharing: LoadSharing) -> None:
        """From now on, scale only while this gateway holds the lease (:meth:`lead`), and
        otherwise tell ``sharing`` the load; until :meth:`lead` says otherwise, follow."""
        self._sharing = sharing
        self.leading = False

    def lead(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        if not leading:
            for key in list(self._timers):
                self._cancel_timer(key)
            for queue in list(self._queues.values()):
                self._hand_over(queue)
            return
        for queue in list(self._queues.values()):
            self._workers.prepare(queue.spec)
            self.pool_changed(queue)

    def remote_load(self, pool: tuple[str, str], gateway: str, load: RemoteLoad) -> None:
        self._remote.setdefault(pool, {})[gateway] = load
        queue = self._queues.get(pool)
        if queue is not None:
            self.pool_changed(queue)

    def forget_gateways(self, alive: set[str]) -> None:
        for pool, loads in list(self._remote.items()):
            gone = set(loads) - alive
            for gateway in gone:
                del loads[gateway]
            if gone and (queue := self._queues.get(pool)) is not None:
                self.pool_changed(queue)

    def loads(self) -> list[ModelQueue]:
        return list(self._queues.values())

    def _load_of(self, queue: ModelQueue) -> tuple[int, float]:
        """Requests queued or computing for ``queue``'s pool, here and at the gateways this
        one leads, and when the last of them arrived."""
        active, last_request_at = queue.active_requests, queue.last_request_at
        for load in self._remote.get(queue.spec.key, {}).values():
            active += load.active
            last_request_at = max(last_request_at, load.last_request_at)
        return active, last_request_at

    def release(self, queue: ModelQueue, reason: str) -> None:
        """Stop managing a removed model version: its workers (local and remote) are told
        to leave, its starting processes and template are stopped."""
        spec = queue.spec
        self._states.pop(spec.key, None)
        self._queues.pop(spec.key, None)
        self._remote.pop(spec.key, None)
        self._cancel_timer(spec.key)
        queue.managed_by(None)
        for process in self._workers.started(spec):
            self._workers.retire(process)
        self._dispatcher.retire_all(spec.key, reason)
        self._workers.release(spec, still_starting=set(queue.starting))
        self._dispatcher.forget(spec.key)

    def tune(self, key: tuple[str, str], tuner: Tuner | None) -> None:
        """Size pool ``key`` by ``tuner`` too (a plan's, :mod:`ketch.planning.tuner`; None:
        by its autoscaler alone again)."""
        if tuner is None:
            self._tuners.pop(key, None)
        else:
            self._tuners[key] = tuner
        self._sample_if_needed()

    def renew(self, queue: ModelQueue) -> bool:
        """Replace the workers the pool runs now (its resources are about to change, which
        :meth:`ModelQueue.reconfigure` then tells the pool) with workers started from then
        on: each old one leaves once it is idle and enough new ones are ready to carry the load
        without it. Whether there were any to replace."""
        stale = self._workers.started(queue.spec)
        if stale:
            self._stale[queue.spec.key] = stale
            self._sample_if_needed()
        return bool(stale)

    def start(self) -> None:
        self._running = True
        self._memory_task = asyncio.create_task(self._check_memory(), name="ketch-memory")
        self._sample_if_needed()

    def _sample_if_needed(self) -> None:
        if self._running and (self._tuners or self._stale) and self._sampling is None:
            self._sampling = asyncio.create_task(self._sample(), name="ketch-tuner")

    async def stop(self) -> None:
        for key in list(self._timers):
            self._cancel_timer(key)
        self._running = False
        for task in (self._memory_task, self._sampling):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _sample(self) -> None:
        """Feed the tuners their queues' arrivals, and look at renewing pools again (an old
        worker that was busy may be idle now), until neither is left."""
        while self._tuners or self._stale:
            await asyncio.sleep(SAMPLE_S)  # the envelope's sampling period, not a wait for a peer
            now = time.monotonic()
            for key, tuner in list(self._tuners.items()):
                queue = self._queues.get(key)
                if queue is None:
                    continue
                before = tuner.wanted
                if tuner.update(now, queue.arrived) != before:
                    self.pool_changed(queue)
            for key in list(self._stale):
                if (queue := self._queues.get(key)) is not None:
                    self.pool_changed(queue)
                else:
                    del self._stale[key]
        self._sampling = None

    async def _check_memory(self) -> None:
        while True:
            await asyncio.sleep(MEMORY_CHECK_S)  # a sampling period, not a wait for a peer
            for spec, process, why in self._workers.over_memory():
                self._dispatcher.recycle(spec, process, why)

    def process_joined(self, process: ProcessKey) -> None:
        self._workers.joined(process)

    def process_stalled(self, worker: Worker, why: str) -> None:
        process = process_of(worker)
        if process is not None:  # a worker started by hand is not the pool's to kill
            self._workers.kill(process, why)

    def pool_changed(self, queue: ModelQueue) -> None:
        """Start or stop workers as ``queue``'s load asks, and set the timer for the next
        change that time alone brings."""
        state = self._states.get(queue.spec.key)
        if state is None or queue.unhealthy_because is not None:
            return
        if not self.leading:
            self._hand_over(queue)
            if self._sharing is not None:
                self._sharing.report(queue)
            return
        now = time.monotonic()
        spec = queue.spec
        stale_ready, stale_starting = self._stale_of(queue)
        current = queue.ready_replicas + len(queue.starting)
        # Old workers being renewed do not count: their replacements start now.
        counted = current - len(stale_ready) - stale_starting
        active, last_request_at = self._load_of(queue)
        tuner = self._tuners.get(spec.key)
        tuned = tuner.wanted if tuner is not None else 0
        step = scale_step(spec.pool, counted, active, now - last_request_at, now, state, tuned)
        started = 0
        while started < step and self._workers.spawn(spec):
            started += 1
        if step < 0:
            self._scale_down(queue, -step, current, _why_fewer(spec.pool, current))
        if stale_ready:
            self._retire_stale(queue, stale_ready, needed=counted + max(step, 0))
        self._wake_later(queue, state, now, backing_off=started < step)

    def _stale_of(self, queue: ModelQueue) -> tuple[list[WorkerSlot], int]:
        """The ready workers, and the number of starting ones, that ``queue``'s renewal
        replaces (those that exited are forgotten)."""
        key = queue.spec.key
        stale = self._stale.get(key)
        if stale is None:
            return [], 0
        stale &= self._workers.started(queue.spec)
        if not stale:
            del self._stale[key]
            return [], 0
        ready = [slot for slot in queue.worker_slots() if slot.info.launch in stale]
        return ready, len(stale & set(queue.starting))

    def _retire_stale(self, queue: ModelQueue, stale: list[WorkerSlot], needed: int) -> None:
        """Let go of the ``stale`` workers the ready new ones can do without (keeping as many
        as the ``needed`` workers lack of new ones): the idle ones now, the busy ones once
        they answer what they hold (they take no new batch; the sampler looks again)."""
        new_ready = queue.ready_replicas - len(stale)
        spare = max(0, new_ready + len(stale) - needed) if new_ready < needed else len(stale)
        kept = [slot for slot in stale if not queue.holds_state(slot.info.identity)]
        going = sorted(kept, key=lambda slot: len(slot.batches))[:spare]  # the idle first
        why = "renewed: the model's resources changed, a worker started with them replaces it"
        for slot in going:
            if slot.batches:
                slot.leaving = True
                continue
            assert slot.info.launch is not None  # the pool started it
            self._workers.retire(slot.info.launch)
            self._dispatcher.retire(slot.info, why)

    def _hand_over(self, queue: ModelQueue) -> None:
        """Let go of the workers this gateway started while it held the lease (it lost it
        while alive: Redis was out of its reach), each once it has no batch in flight: the
        holder now sizes the pool, and starts what the load asks for."""
        started = self._workers.started(queue.spec)
        if started:
            why = "handed over: another gateway holds the pools lease and sizes the pool now"
            self._retire_idle(queue, len(started), why)

    def _scale_down(self, queue: ModelQueue, count: int, current: int, why: str) -> None:
        retired = self._retire_idle(queue, count, why)
        if retired and current == len(retired):
            self._dispatcher.scaled_to_zero(queue.spec)

    def _retire_idle(self, queue: ModelQueue, count: int, why: str) -> list[Worker]:
        """Let go of up to ``count`` of the workers this pool started that are idle now."""
        retired = idle_started_workers(queue, count, started=self._workers.started(queue.spec))
        for worker in retired:
            assert worker.launch is not None  # the pool started it
            self._workers.retire(worker.launch)
            self._dispatcher.retire(worker, why)
        return retired

    def _wake_later(
        self, queue: ModelQueue, state: ScaleState, now: float, *, backing_off: bool
    ) -> None:
        """Look at the pool again when its idle period or its crash back-off ends: the changes
        no event announces."""
        spec = queue.spec
        moments = []
        if state.surplus_since is not None:
            moments.append(state.surplus_since + spec.pool.idle_timeout_s)
        active, last_request_at = self._load_of(queue)
        if active == 0 and queue.ready_replicas > spec.pool.min_replicas:
            moments.append(last_request_at + spec.pool.idle_timeout_s)
        if backing_off:
            retry_at = self._workers.retry_at(spec)
            # Without a back-off to wait out, a template still loading says when it is ready.
            if retry_at is not None:
                moments.append(retry_at)
        if not moments:
            return  # a timer still pending only looks again, and finds nothing to do
        at = min(moments) + _TIMER_SLACK_S
        pending = self._timers.get(spec.key)
        if pending is not None and pending[0] <= at:
            # It fires no later and looks again then. Kept, since each request that ends a
            # pool's load moves its idle moment a little later: no timer churn per request.
            return
        self._cancel_timer(spec.key)
        timer = asyncio.get_running_loop().call_later(max(at - now, 0.0), self._look_again, queue)
        self._timers[spec.key] = (at, timer)

    def _look_again(self, queue: ModelQueue) -> None:
        self._timers.pop(queue.spec.key, None)
        self.pool_changed(queue)

    def _cancel_timer(self, key: tuple[str, str]) -> None:
        pending = self._timers.pop(key, None)
        if pending is not None:
            pending[1].cancel()
