"""The pool manager: how many local workers each model version runs, from its load.

A pool grows at once when its load asks for more workers (a request to a pool at zero starts
one immediately) and shrinks only after it has had more workers than it needs for
``idle_timeout_s``: that delay is the hysteresis that keeps a pool from flapping. After
``idle_timeout_s`` without any request, a pool with ``min_replicas=0`` is back to zero
processes. The decision itself is :func:`scale_step`, a pure function.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass

from ketch.pools.supervisor import LocalWorkers
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.queue import ModelQueue
from ketch.specs.models import ModelSpec, PoolSpec

#: How often pools are reconciled with their load (scale-ups on demand do not wait for it).
TICK_S = 0.1


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
    spec: PoolSpec, current: int, active: int, idle_s: float, now: float, state: ScaleState
) -> int:
    """Workers to start (> 0) or stop (< 0) now, for a pool of ``current`` workers."""
    desired = desired_replicas(spec, active, idle_s)
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


class PoolManager:
    """Reconciles every pool of the served file with its load, every :data:`TICK_S` and at
    once when a request finds its pool with no worker."""

    def __init__(self, dispatcher: Dispatcher, workers: LocalWorkers) -> None:
        self._dispatcher = dispatcher
        self._workers = workers
        self._states: dict[tuple[str, str], ScaleState] = {}
        self._task: asyncio.Task[None] | None = None

    def manage(self, spec: ModelSpec) -> None:
        queue = self._dispatcher.add_model(spec)
        self._states[spec.key] = ScaleState()
        queue.on_demand = lambda: self.reconcile(queue)
        self._workers.prepare(spec)
        self.reconcile(queue)

    def release(self, queue: ModelQueue, reason: str) -> None:
        """Stop managing a removed model version: its workers (local and remote) are told
        to leave, its starting processes and template are stopped."""
        spec = queue.spec
        self._states.pop(spec.key, None)
        queue.on_demand = None
        for pid in self._workers.pids(spec):
            self._workers.retire(pid)
        self._dispatcher.retire_all(spec.key, reason)
        self._workers.release(spec, still_starting=set(queue.starting))
        self._dispatcher.forget(spec.key)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ketch-pools")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)  # a reconcile period, not a wait for a peer
            for spec, pid, why in self._workers.over_memory():
                self._dispatcher.recycle(spec, pid, why)
            for queue in self._dispatcher.queues():
                if queue.spec.key in self._states:
                    self.reconcile(queue)

    def reconcile(self, queue: ModelQueue) -> None:
        if queue.unhealthy_because is not None:
            return
        now = time.monotonic()
        queue.expire_cold_starts(now)
        spec = queue.spec
        current = queue.ready_replicas + len(queue.starting)
        step = scale_step(
            spec.pool,
            current,
            queue.active_requests,
            now - queue.last_request_at,
            now,
            self._states[spec.key],
        )
        for _ in range(step):
            if not self._workers.spawn(spec):
                break  # backing off after a crash: the next tick tries again
        if step < 0:
            retired = queue.idle_workers(-step, local_pids=self._workers.pids(spec))
            for worker in retired:
                self._workers.retire(worker.pid)
                self._dispatcher.retire(
                    worker,
                    f"scaled down after {spec.pool.idle_timeout_s:g} s with more workers than load",
                )
            if retired and current == len(retired):
                self._dispatcher.scaled_to_zero(spec)
