"""Stalled batches in a ModelQueue, in process: a batch held far longer than the model usually
takes is retried on another worker, and a worker that never answers is dropped
(:mod:`ketch.serving.stalls`)."""

from __future__ import annotations

from typing import Any

import pytest

import ketch.serving.queue as queue_module
from ketch.serving.sink import Worker
from ketch.serving.stalls import STALL_MIN_S, STALL_UNKNOWN_S, StallWatch
from tests.unit.fakes import FakeSink, described, in_loop, make_worker
from tests.unit.test_queue import RecordingPool, new_queue, within


class StallPool(RecordingPool):
    def __init__(self) -> None:
        super().__init__()
        self.stalled: list[tuple[Worker, str]] = []

    def process_stalled(self, worker: Worker, why: str) -> None:
        self.stalled.append((worker, why))


@pytest.fixture
def quick_stall_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_module, "STALL_CHECK_S", 0.005)


async def sent_batches(sink: FakeSink, count: int) -> list[Any]:
    return await sink.wait_for_batches(count, timeout_s=5.0)


@in_loop
async def test_a_stalled_batch_is_retried_on_another_worker_and_its_late_answer_ignored(
    quick_stall_checks: None,
) -> None:
    queue, sink, _ = new_queue(stall_timeout_s=0.05)
    pool = StallPool()
    queue.managed_by(pool)
    hung, healthy = make_worker(queue.spec), make_worker(queue.spec)
    queue.add_worker(hung)
    answer = queue.submit([1], within())
    first = (await sent_batches(sink, 1))[0]
    assert first.worker is hung
    queue.add_worker(healthy)  # idle, and the hung worker takes nothing more once it stalls
    retry = (await sent_batches(sink, 2))[1]
    assert retry.worker is healthy and retry.inputs == [1]
    queue.batch_replied(healthy, retry.batch_id, [2])
    assert await answer == [2]
    queue.batch_replied(hung, first.batch_id, [999])  # late: ignored, no harm
    assert [w["pid"] for w in described(queue)["workers"]] == [hung.pid, healthy.pid]
    assert pool.stalled == [] and sink.dropped == []


@in_loop
async def test_a_worker_that_never_answers_is_dropped_and_its_process_killed(
    quick_stall_checks: None,
) -> None:
    queue, sink, _ = new_queue(stall_timeout_s=0.02)
    pool = StallPool()
    queue.managed_by(pool)
    silent = make_worker(queue.spec)
    sink.join(silent)
    queue.add_worker(silent)
    answer = queue.submit([1], within())
    await sent_batches(sink, 1)
    ((dropped, why),) = await sink.wait_for_drops(1, timeout_s=5.0)
    assert dropped is silent and "holding a batch for" in why and "a stall is 0.0 s" in why
    assert pool.stalled == [(silent, why)]
    queue.remove_worker(silent, why)  # as the broker reports the drop
    assert not answer.done()  # it waits for another worker, its retry not used up
    other = make_worker(queue.spec)
    queue.add_worker(other)
    batch = (await sent_batches(sink, 2))[1]
    queue.batch_replied(other, batch.batch_id, [5])
    assert await answer == [5]


def test_the_stall_time_is_derived_from_the_batches_observed() -> None:
    watch = StallWatch()
    assert watch.limit_s(None) == STALL_UNKNOWN_S  # nothing observed yet
    for _ in range(30):
        watch.observe(0.01)
    assert watch.limit_s(None) == STALL_MIN_S
    for _ in range(30):
        watch.observe(0.5)
    assert watch.limit_s(None) == pytest.approx(5.0)
    assert watch.limit_s(2.5) == 2.5
    assert new_queue(stall_timeout_s=2.5)[0].stall_after_s() == 2.5
