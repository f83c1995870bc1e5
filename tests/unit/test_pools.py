"""PoolManager in process, over a real dispatcher: workers started when requests need them,
stopped by its timers once idle, started again when a back-off ends. The processes are fakes
that record what the manager asks; a test says when a started process's worker is READY.

The pure decision, ``scale_step``, is tested in ``tests/test_pools.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import msgspec

from ketch.observability.events import Event
from ketch.pools.scaling import PoolManager
from ketch.pools.supervisor import WorkerProcesses
from ketch.serving import status
from ketch.serving.admission import Deadlines
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import Deadline
from ketch.serving.queue import ModelQueue
from ketch.serving.sink import ProcessKey, Worker
from ketch.specs.models import ModelSpec
from tests.unit.fakes import FakeSink, described, in_loop, make_spec, make_worker, receiver_of


def within() -> Deadline:
    return Deadlines(request_timeout_s=30.0).deadline(None, None)


class FakeProcesses:
    """WorkerProcesses as the pool manager uses it. A spawn is reported to the dispatcher as
    started, as WorkerProcesses reports it; while ``not_before`` has not passed (a crash
    back-off), or while ``loading`` (a template not ready yet), spawns are refused."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._pids = itertools.count(7001)
        self._running: dict[ProcessKey, ModelSpec] = {}
        self.spawned: list[tuple[ProcessKey, float]] = []
        self.refused = 0
        #: The pids of the processes retired (all of this machine).
        self.retired: list[int] = []
        self.retired_at: list[float] = []
        self.not_before = 0.0
        self.loading = False
        self.joined_processes: list[ProcessKey] = []
        self._waiters: list[asyncio.Future[None]] = []

    def prepare(self, spec: ModelSpec) -> None:
        pass

    def started(self, spec: ModelSpec) -> set[ProcessKey]:
        return {key for key, running in self._running.items() if running.key == spec.key}

    def retry_at(self, spec: ModelSpec) -> float | None:
        return self.not_before if self.not_before > time.monotonic() else None

    def joined(self, process: ProcessKey) -> None:
        self.joined_processes.append(process)

    def spawn(self, spec: ModelSpec) -> bool:
        now = time.monotonic()
        if self.loading or now < self.not_before:
            self.refused += 1
            return False
        process = f"p-{next(self._pids)}"
        self._running[process] = spec
        self.spawned.append((process, now))
        self._dispatcher.process_started(spec, process)
        self._changed()
        return True

    def retire(self, process: ProcessKey) -> None:
        self.retired.append(int(process.removeprefix("p-")))
        self.retired_at.append(time.monotonic())
        self._changed()

    def release(self, spec: ModelSpec, still_starting: set[ProcessKey]) -> None:
        pass

    def over_memory(self) -> list[tuple[ModelSpec, ProcessKey, str]]:
        return []

    def kill(self, process: ProcessKey, why: str) -> None:
        pass

    def exited(self, pid: int) -> None:
        """Process ``pid`` exited, as it does after it was told DISCONNECT."""
        spec = self._running.pop(f"p-{pid}")
        self._dispatcher.process_exited(spec, f"p-{pid}", "exit code 0", pid in self.retired)

    def _changed(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float = 1.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not condition():
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter


class Pools:
    """A pool manager over a real dispatcher, a FakeSink broker and fake processes."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.dispatcher = Dispatcher(self.events.append)
        self.sink = FakeSink(self.dispatcher)
        self.dispatcher.attach(self.sink)
        self.processes = FakeProcesses(self.dispatcher)
        self.manager = PoolManager(self.dispatcher, cast(WorkerProcesses, self.processes))

    def manage(self, **spec: Any) -> ModelQueue:
        model = make_spec(**spec)
        self.manager.manage(model)
        return self.dispatcher.queue_for(model.name, model.version)

    def ready(self, queue: ModelQueue, pid: int) -> Worker:
        """The worker of process ``pid`` says READY."""
        return self.sink.join(make_worker(queue.spec, pid=pid, launch=f"p-{pid}"))

    def started(self) -> list[int]:
        return [int(process.removeprefix("p-")) for process, _ in self.processes.spawned]

    def reply_all(self) -> None:
        """Every batch sent so far is answered (with its inputs)."""
        for batch in self.sink.sent:
            receiver_of(batch.worker).batch_replied(
                batch.worker, batch.batch_id, batch.inputs, None
            )


@contextlib.asynccontextmanager
async def pools() -> AsyncIterator[Pools]:
    harness = Pools()
    try:
        yield harness
    finally:
        await harness.manager.stop()  # cancels its timers


@in_loop
async def test_a_request_to_a_pool_at_zero_starts_one_worker_at_once() -> None:
    async with pools() as harness:
        queue = harness.manage(max_replicas=3)
        assert harness.started() == []  # no traffic: nothing runs
        answer = queue.submit([1], within())
        assert len(harness.started()) == 1  # at once, before anything is awaited
        assert status.state_of(queue) == "starting"
        harness.ready(queue, harness.started()[0])
        harness.reply_all()
        assert await answer == [1]
        assert len(harness.started()) == 1
        assert queue.cold_starts == 1


@in_loop
async def test_load_above_target_inflight_starts_more_workers_up_to_max_replicas() -> None:
    async with pools() as harness:
        queue = harness.manage(target_inflight=2, max_replicas=3)
        answers = [queue.submit([0], within())]
        harness.ready(queue, harness.started()[0])
        counts = []
        for n in range(1, 10):
            answers.append(queue.submit([n], within()))
            counts.append(len(harness.started()))
        # 3 requests need 2 workers, 5 need 3; more never go past max_replicas.
        assert counts == [1, 2, 2, 3, 3, 3, 3, 3, 3]
        for pid in harness.started()[1:]:
            harness.ready(queue, pid)
        assert status.sample(queue).ready == 3
        harness.reply_all()
        outputs = await asyncio.wait_for(asyncio.gather(*answers), 1)
        assert outputs == [[n] for n in range(10)]


@in_loop
async def test_an_idle_pool_goes_back_to_zero_through_its_timer() -> None:
    async with pools() as harness:
        queue = harness.manage(idle_timeout_s=0.05)
        answer = queue.submit([1], within())
        (pid,) = harness.started()
        worker = harness.ready(queue, pid)
        harness.reply_all()
        await answer
        await harness.processes.wait_until(lambda: bool(harness.processes.retired))
        assert harness.processes.retired == [pid]
        assert harness.sink.dropped == [
            (worker, "scaled down after 0.05 s with more workers than load")
        ]
        assert queue.ready_replicas == 0
        assert [e.kind for e in harness.events if e.kind == "scaled_to_zero"] == ["scaled_to_zero"]
        harness.processes.exited(pid)
        assert (status.state_of(queue), queue.worker_exits) == ("zero", 0)  # expected: not a crash
        queue.submit([2], within())  # and the next request starts a worker again
        assert len(harness.started()) == 2
        assert queue.cold_starts == 2


@in_loop
async def test_under_lighter_load_the_pool_stops_one_idle_worker_per_idle_period() -> None:
    async with pools() as harness:
        idle_s = 0.05
        queue = harness.manage(
            max_batch_size=1, target_inflight=1, max_replicas=3, idle_timeout_s=idle_s
        )
        answers = [queue.submit([n], within()) for n in range(3)]
        busy, *idle = (harness.ready(queue, pid) for pid in harness.started())
        assert [batch.worker for batch in harness.sink.sent] == [busy, *idle]
        for batch in harness.sink.sent[1:]:
            receiver_of(batch.worker).batch_replied(
                batch.worker, batch.batch_id, batch.inputs, None
            )
        await asyncio.gather(*answers[1:])
        processes = harness.processes
        await processes.wait_until(lambda: len(processes.retired) == 2)
        assert sorted(processes.retired) == sorted(worker.pid for worker in idle)
        assert processes.retired_at[1] - processes.retired_at[0] >= idle_s  # one per period
        assert list(harness.sink.workers()) == [busy]  # never the one computing
        assert "scaled_to_zero" not in [e.kind for e in harness.events]
        harness.reply_all()
        assert await answers[0] == [0]


@in_loop
async def test_a_spawn_refused_during_a_back_off_is_retried_when_it_ends() -> None:
    async with pools() as harness:
        queue = harness.manage()
        harness.processes.not_before = time.monotonic() + 0.05
        answer = queue.submit([1], within())
        assert (harness.started(), harness.processes.refused) == ([], 1)
        await harness.processes.wait_until(lambda: bool(harness.processes.spawned))
        assert harness.processes.refused == 1  # waited for the back-off, did not poll
        ((process, at),) = harness.processes.spawned
        pid = int(process.removeprefix("p-"))
        assert at >= harness.processes.not_before
        harness.ready(queue, pid)
        harness.reply_all()
        assert await answer == [1]


@in_loop
async def test_a_spawn_refused_while_the_template_loads_happens_once_it_is_ready() -> None:
    async with pools() as harness:
        queue = harness.manage(preload=True)
        harness.processes.loading = True
        queue.submit([1], within())
        assert (harness.started(), harness.processes.refused) == ([], 1)
        harness.processes.loading = False
        template = {"pid": 6000, "state": "ready", "rss_mb": 40}
        harness.dispatcher.template_changed(queue.spec, template)
        assert len(harness.started()) == 1


@in_loop
async def test_raising_min_replicas_starts_workers_at_once_without_traffic() -> None:
    async with pools() as harness:
        queue = harness.manage()
        pool = msgspec.structs.replace(queue.spec.pool, min_replicas=2, max_replicas=2)
        queue.reconfigure(msgspec.structs.replace(queue.spec, pool=pool))
        assert len(harness.started()) == 2
        for pid in harness.started():
            harness.ready(queue, pid)
        assert described(queue)["replicas"] == {"ready": 2, "starting": 0}


@in_loop
async def test_a_released_pool_lets_its_workers_go_and_starts_no_more() -> None:
    async with pools() as harness:
        queue = harness.manage(min_replicas=1, idle_timeout_s=0.05)
        (pid,) = harness.started()
        worker = harness.ready(queue, pid)
        harness.dispatcher.remove_model(queue.spec.key, "removed")
        harness.manager.release(queue, "model 'm:1' was removed")
        assert harness.processes.retired == [pid]
        assert harness.sink.dropped == [(worker, "model 'm:1' was removed")]
        assert len(harness.started()) == 1  # losing its worker did not start another


@in_loop
async def test_a_renewed_pool_replaces_each_old_worker_once_a_new_one_is_ready() -> None:
    async with pools() as harness:
        harness.manager.start()  # its sampler looks again at an old worker that was busy
        queue = harness.manage(min_replicas=2, max_replicas=2)
        old = harness.started()
        workers = {pid: harness.ready(queue, pid) for pid in old}
        busy = queue.submit([1], within())
        busy_pid = next(pid for pid, w in workers.items() if w is harness.sink.sent[0].worker)
        resources = msgspec.structs.replace(queue.spec.resources, threads=2)
        assert harness.manager.renew(queue)
        queue.reconfigure(msgspec.structs.replace(queue.spec, resources=resources))
        new = [pid for pid in harness.started() if pid not in old]
        assert len(new) == 2  # both replacements start at once, beside the old workers
        assert harness.processes.retired == []  # none ready yet: the old ones keep serving
        harness.ready(queue, new[0])
        (idle_pid,) = set(old) - {busy_pid}
        assert harness.processes.retired == [idle_pid]  # one new ready: one old one goes
        harness.ready(queue, new[1])
        assert harness.processes.retired == [idle_pid]  # the other still computes its batch
        later = queue.submit([2], within())
        assert harness.sink.sent[-1].worker is not workers[busy_pid]  # it takes no new batch
        harness.reply_all()
        assert await busy == [1] and await later == [2]
        await harness.processes.wait_until(lambda: len(harness.processes.retired) == 2)
        assert harness.processes.retired == [idle_pid, busy_pid]
        assert queue.ready_replicas == 2 and len(harness.started()) == 4  # no more started
