"""ModelQueue in process: batches as a worker receives them, answers and errors as a client
gets them, the counts ``GET /models`` and ``/metrics`` show. The test plays the dispatcher:
it adds workers, completes or fails their batches, and reports them lost."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import numpy as np
import pytest

import ketch.serving.queue as queue_module
from ketch.observability.metrics import Metrics
from ketch.serving import status
from ketch.serving.admission import Deadlines
from ketch.serving.jobs import Backoff, Deadline, PredictionError
from ketch.serving.queue import ModelQueue
from ketch.serving.refusals import queue_full
from ketch.serving.sink import ProcessKey
from ketch.zmq_transport.broker import RemoteError
from ketch.zmq_transport.protocol import ErrorKind
from tests.unit.fakes import (
    FakeSink,
    batches_counted,
    described,
    in_loop,
    make_spec,
    make_worker,
)

#: The server's request timeout in these tests: long enough never to matter unless a test
#: sets its own, short one.
DEADLINES = Deadlines(request_timeout_s=30.0)


def within(ms: float | None = None) -> Deadline:
    """The deadline of a request starting now, ``ms`` long (the server's timeout if None)."""
    return DEADLINES.deadline(ms, None)


def new_queue(**spec: Any) -> tuple[ModelQueue, FakeSink, Metrics]:
    """A queue of a model from the served file (as the dispatcher adds it), and its sink."""
    sink = FakeSink()
    metrics = Metrics()
    model = make_spec(**spec)
    queue = ModelQueue(
        model, sink, itertools.count(1).__next__, metrics.for_model(model.name, model.version)
    )
    queue.served_from_file = True
    return queue, sink, metrics


async def refusal(future: asyncio.Future[Any], timeout_s: float = 1.0) -> PredictionError:
    """The PredictionError ``future`` fails with, within ``timeout_s``."""
    with pytest.raises(PredictionError) as caught:
        await asyncio.wait_for(future, timeout_s)
    return caught.value


class RecordingPool:
    """A PoolListener that notes the active requests each time it is told."""

    def __init__(self) -> None:
        self.told: list[int] = []

    def pool_changed(self, queue: ModelQueue) -> None:
        self.told.append(queue.active_requests)

    def process_joined(self, process: ProcessKey) -> None:
        pass


# -- batching -------------------------------------------------------------------------------


@in_loop
async def test_a_lone_request_is_sent_at_once_and_answered() -> None:
    queue, sink, metrics = new_queue()
    worker = make_worker(queue.spec)
    queue.add_worker(worker)
    answer = queue.submit([1, 2, 3], within())
    assert sink.sizes() == [3]  # sent before the caller even awaits
    assert described(queue)["in_flight"] == 3
    queue.batch_replied(worker, sink.sent[0].batch_id, [2, 4, 6])
    assert await asyncio.wait_for(answer, 1) == [2, 4, 6]
    assert batches_counted(metrics, queue.spec) == (1, 3)
    now = described(queue)
    assert (now["in_flight"], now["active_requests"]) == (0, 0)
    assert now["latency_ms"]["requests"] == 1


@in_loop
async def test_one_request_at_a_time_goes_to_every_worker_in_turn() -> None:
    # A worker that joined later (a hand-started one beside a local one) takes its share:
    # the free worker sent to longest ago gets the next batch, not always the first to join.
    queue, sink, _ = new_queue()
    local, remote = make_worker(queue.spec), make_worker(queue.spec, host="elsewhere")
    queue.add_worker(local)
    queue.add_worker(remote)
    for n in range(6):
        answer = queue.submit([n], within())
        sent = sink.sent[-1]
        queue.batch_replied(sent.worker, sent.batch_id, [n])
        assert await asyncio.wait_for(answer, 1) == [n]
    assert [sent.worker for sent in sink.sent] == [local, remote] * 3


@in_loop
async def test_a_batch_goes_to_the_worker_with_the_fewest_in_flight() -> None:
    queue, sink, _ = new_queue()
    first, second = make_worker(queue.spec, capacity=4), make_worker(queue.spec, capacity=4)
    queue.add_worker(first)
    queue.add_worker(second)
    for n in range(4):
        queue.submit([n], within())
    assert [sent.worker for sent in sink.sent] == [first, second, first, second]
    queue.batch_replied(second, sink.sent[1].batch_id, [1])
    queue.submit([4], within())
    assert sink.sent[-1].worker is second  # one in flight against the first's two


@in_loop
async def test_requests_waiting_for_a_busy_worker_share_batches_up_to_max_batch_size() -> None:
    queue, sink, _ = new_queue(max_batch_size=4)
    worker = make_worker(queue.spec)
    queue.add_worker(worker)
    first = queue.submit(["a"], within())
    waiting = [queue.submit(inputs, within()) for inputs in (["b", "c"], ["d", "e"], ["f"])]
    assert sink.sizes() == [1]
    assert described(queue)["queue_depth"] == 5
    assert status.sample(queue).queue_depth == 5
    queue.batch_replied(worker, sink.sent[0].batch_id, ["A"])
    assert sink.sent[1].inputs == ["b", "c", "d", "e"]  # full: "f" waits for the next one
    queue.batch_replied(worker, sink.sent[1].batch_id, ["B", "C", "D", "E"])
    assert sink.sent[2].inputs == ["f"]
    queue.batch_replied(worker, sink.sent[2].batch_id, ["F"])
    assert await first == ["A"]
    assert await asyncio.gather(*waiting) == [["B", "C"], ["D", "E"], ["F"]]
    assert described(queue)["batching"]["last_batch_size"] == 1


@in_loop
async def test_each_input_takes_its_requests_parameters_to_a_model_that_takes_them() -> None:
    queue, sink, _ = new_queue(max_batch_size=4, takes_params=True)
    worker = make_worker(queue.spec)
    queue.add_worker(worker)
    first = queue.submit(["a"], within(), {"lang": "fr"})
    waiting = [queue.submit(["b", "c"], within()), queue.submit(["d"], within(), {"n": 1})]
    assert sink.sent[0].params == [{"lang": "fr"}]
    queue.batch_replied(worker, sink.sent[0].batch_id, ["A"])
    assert sink.sent[1].inputs == ["b", "c", "d"]
    assert sink.sent[1].params == [{}, {}, {"n": 1}]  # none given: an empty dict each
    queue.batch_replied(worker, sink.sent[1].batch_id, ["B", "C", "D"])
    assert await first == ["A"]
    assert await asyncio.gather(*waiting) == [["B", "C"], ["D"]]
    plain, plain_sink, _ = new_queue()
    plain.add_worker(make_worker(plain.spec))
    plain.submit(["x"], within())
    assert plain_sink.sent[0].params is None  # a model that takes none is sent none


@in_loop
async def test_a_request_larger_than_max_batch_size_is_split_and_answered_in_order() -> None:
    queue, sink, metrics = new_queue(max_batch_size=2)
    worker = make_worker(queue.spec, capacity=3)
    queue.add_worker(worker)
    answer = queue.submit([0, 1, 2, 3, 4], within())
    assert [batch.inputs for batch in sink.sent] == [[0, 1], [2, 3], [4]]
    for batch in reversed(sink.sent):  # the last part comes back first
        queue.batch_replied(worker, batch.batch_id, [10 * x for x in batch.inputs])
    assert await asyncio.wait_for(answer, 1) == [0, 10, 20, 30, 40]
    assert batches_counted(metrics, queue.spec) == (3, 5)


@in_loop
async def test_numpy_requests_are_concatenated_by_shape_and_split_back() -> None:
    queue, sink, _ = new_queue(batch_input="numpy")
    worker = make_worker(queue.spec)
    queue.add_worker(worker)
    busy = queue.submit(np.zeros((1, 2)), within())
    pairs = queue.submit(np.array([[1, 2], [3, 4]]), within())
    triple = queue.submit(np.array([[5, 6, 7]]), within())
    pair = queue.submit(np.array([[8, 9]]), within())
    queue.batch_replied(worker, sink.sent[0].batch_id, np.zeros(1))
    batch = sink.sent[1].inputs
    assert isinstance(batch, np.ndarray)
    np.testing.assert_array_equal(batch, [[1, 2], [3, 4], [8, 9]])  # the [5, 6, 7] waits
    queue.batch_replied(worker, sink.sent[1].batch_id, batch.sum(axis=1))
    np.testing.assert_array_equal(sink.sent[2].inputs, [[5, 6, 7]])
    queue.batch_replied(worker, sink.sent[2].batch_id, np.array([18]))
    await busy
    np.testing.assert_array_equal(await pairs, [3, 7])
    np.testing.assert_array_equal(await pair, [17])
    np.testing.assert_array_equal(await triple, [18])


@in_loop
async def test_max_delay_holds_a_small_batch_for_more_requests() -> None:
    queue, sink, _ = new_queue(max_batch_size=4, max_delay_ms=20)
    worker = make_worker(queue.spec)
    queue.add_worker(worker)
    first = queue.submit([1], within())
    second = queue.submit([2], within())
    assert sink.sent == []  # the worker is free, yet the batch waits for more inputs
    (batch,) = await sink.wait_for_batches(1)
    assert batch.inputs == [1, 2]
    queue.batch_replied(worker, batch.batch_id, [10, 20])
    assert [await first, await second] == [[10], [20]]


@in_loop
async def test_max_delay_does_not_hold_a_full_batch() -> None:
    queue, sink, _ = new_queue(max_batch_size=3, max_delay_ms=10_000)
    queue.add_worker(make_worker(queue.spec))
    queue.submit([1, 2], within())
    assert sink.sent == []
    queue.submit([3], within())
    assert [batch.inputs for batch in sink.sent] == [[1, 2, 3]]


# -- back-pressure and deadlines ------------------------------------------------------------


def test_retry_after_is_how_long_the_queue_takes_to_drain_within_a_minute() -> None:
    spec = make_spec(max_queue=10)
    assert queue_full(spec, queued=50, drain_rate=10.0).headers == {"Retry-After": "5"}
    assert queue_full(spec, queued=41, drain_rate=10.0).headers == {"Retry-After": "5"}
    assert queue_full(spec, queued=1, drain_rate=1000.0).headers == {"Retry-After": "1"}
    assert queue_full(spec, queued=10_000, drain_rate=1.0).headers == {"Retry-After": "60"}
    assert queue_full(spec, queued=10, drain_rate=0.0).headers == {"Retry-After": "1"}


@in_loop
async def test_a_full_queue_answers_429_with_a_retry_after_from_its_drain_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Clock()
    monkeypatch.setattr(queue_module, "time", clock)
    queue, sink, _ = new_queue(max_batch_size=10, max_queue=10)
    worker = make_worker(queue.spec)
    queue.add_worker(worker)
    for _ in range(2):  # two batches of 10 answered one second apart: 10 inputs/s
        queue.submit(list(range(10)), within())
        clock.advance(1.0)
        queue.batch_replied(worker, sink.sent[-1].batch_id, list(range(10)))
    queue.submit(list(range(10)), within())  # computing
    waiting = queue.submit(list(range(9)), within())
    error = await refusal(queue.submit([1, 2], within()))
    assert error.status == 429
    # The smoothed rate is a fifth of the way to 10/s after one measurement: 2/s, so 9
    # waiting inputs take 4.5 s.
    assert error.headers == {"Retry-After": "5"}
    assert error.body == {
        "error": "model 'm:1' has 9 inputs waiting, its max_queue is 10: retry after 5 s",
        "model": "m",
        "version": "1",
    }
    assert (queue.rejected, status.sample(queue).rejected, described(queue)["rejected"]) == (
        1,
        1,
        1,
    )
    assert not waiting.done()  # what was admitted stays queued


@in_loop
async def test_a_request_alone_is_admitted_even_above_max_queue() -> None:
    queue, sink, _ = new_queue(max_queue=2)
    queue.add_worker(make_worker(queue.spec))
    queue.submit([1], within())
    queue.submit([1, 2, 3], within())  # nothing else waits: it is not refused for its size
    error = await refusal(queue.submit([4], within()))
    assert error.status == 429
    assert error.headers["Retry-After"] == "1"  # nothing answered yet: no rate to go by
    assert sink.sizes() == [1]


@in_loop
async def test_a_request_that_never_reached_a_worker_gets_504_at_its_deadline() -> None:
    queue, sink, _ = new_queue()
    worker = make_worker(queue.spec)
    queue.add_worker(worker)
    queue.submit([1], within())  # keeps the only worker busy
    error = await refusal(queue.submit([2], within(ms=20)))
    assert error.status == 504
    assert error.body["error"] == (
        "model 'm:1' did not answer within 20 ms: the request's deadline passed before a "
        "worker was free, so it was never computed"
    )
    assert (queue.expired, status.sample(queue).expired, queue.queue_depth) == (1, 1, 0)
    queue.batch_replied(worker, sink.sent[0].batch_id, [1])
    assert sink.sizes() == [1]  # the late request is not computed once it is too late


@in_loop
async def test_a_request_whose_batch_is_computing_gets_504_at_its_deadline() -> None:
    queue, sink, _ = new_queue()
    worker = make_worker(queue.spec)
    queue.add_worker(worker)
    error = await refusal(queue.submit([1], within(ms=20)))
    assert error.status == 504
    assert "deadline passed while its batch was computing" in error.body["error"]
    queue.batch_replied(worker, sink.sent[0].batch_id, [1])  # the late reply is ignored
    assert described(queue)["expired"] == 1


# -- workers lost, sends that fail ----------------------------------------------------------


@in_loop
async def test_a_batch_of_a_lost_worker_is_retried_on_another_and_answered() -> None:
    queue, sink, metrics = new_queue()
    lost, other = make_worker(queue.spec), make_worker(queue.spec)
    queue.add_worker(lost)
    queue.add_worker(other)
    answer = queue.submit([1, 2], within())
    assert sink.sent[0].worker is lost
    queue.remove_worker(lost, "connection lost")
    retry = sink.sent[1]
    assert (retry.worker, retry.inputs) == (other, [1, 2])
    assert retry.batch_id != sink.sent[0].batch_id
    queue.batch_replied(lost, sink.sent[0].batch_id, [0, 0])  # a reply from the dead is ignored
    queue.batch_replied(other, retry.batch_id, [10, 20])
    assert await asyncio.wait_for(answer, 1) == [10, 20]
    assert batches_counted(metrics, queue.spec) == (2, 4)
    assert status.sample(queue).ready == 1


@in_loop
async def test_a_retried_batch_goes_before_requests_that_came_after_it() -> None:
    queue, sink, _ = new_queue(max_batch_size=1)
    lost, busy = make_worker(queue.spec), make_worker(queue.spec)
    queue.add_worker(lost)
    queue.add_worker(busy)
    queue.submit(["first"], within())
    queue.submit(["second"], within())
    queue.submit(["third"], within())  # waits: both workers are busy
    queue.remove_worker(lost, "connection lost")
    replacement = make_worker(queue.spec)
    queue.add_worker(replacement)
    assert [batch.inputs for batch in sink.sent_to(replacement)] == [["first"]]


@in_loop
async def test_a_batch_is_retried_once_then_fails_with_503_naming_the_worker() -> None:
    queue, sink, _ = new_queue()
    workers = [make_worker(queue.spec) for _ in range(3)]
    for worker in workers:
        queue.add_worker(worker)
    answer = queue.submit([1], within())
    queue.remove_worker(workers[0], "killed by SIGKILL")
    queue.remove_worker(workers[1], "killed by SIGKILL")
    error = await refusal(answer)
    assert error.status == 503
    assert error.body["error"] == (
        f"{workers[1].describe()} was lost while computing this request (killed by SIGKILL), "
        "after 2 attempts"
    )
    assert sink.sent_to(workers[2]) == []  # not sent a third time


@in_loop
async def test_a_failed_send_is_not_an_attempt_nor_counted_and_another_worker_answers() -> None:
    queue, sink, metrics = new_queue()
    unreachable, other = make_worker(queue.spec), make_worker(queue.spec)
    queue.add_worker(unreachable)
    queue.add_worker(other)
    sink.refuse(unreachable)
    answer = queue.submit([1], within())
    assert [batch.worker for batch in sink.refused] == [unreachable]
    assert [batch.worker for batch in sink.sent] == [other]
    assert batches_counted(metrics, queue.spec) == (1, 1)
    # Lost once for real: the refused send used no attempt, so the request has its retry.
    queue.remove_worker(other, "connection lost")
    replacement = make_worker(queue.spec)
    queue.add_worker(replacement)
    (retry,) = sink.sent_to(replacement)
    queue.batch_replied(replacement, retry.batch_id, [10])
    assert await asyncio.wait_for(answer, 1) == [10]
    assert batches_counted(metrics, queue.spec) == (2, 2)


@in_loop
async def test_a_worker_whose_send_failed_takes_nothing_until_reported_lost() -> None:
    queue, sink, metrics = new_queue()
    unreachable = make_worker(queue.spec, capacity=4)
    queue.add_worker(unreachable)
    sink.refuse(unreachable)
    answers = [queue.submit([n], within()) for n in range(3)]
    assert len(sink.refused) == 1  # one try; the later requests are not offered to it
    assert queue.queue_depth == 3
    assert described(queue)["workers"][0]["batches_in_flight"] == 0
    assert batches_counted(metrics, queue.spec) == (0, 0)
    queue.remove_worker(unreachable, "cannot deliver to it")
    assert not any(answer.done() for answer in answers)  # a served model: they wait
    replacement = make_worker(queue.spec)
    queue.add_worker(replacement)
    (batch,) = sink.sent
    assert batch.inputs == [0, 1, 2]  # in their order of arrival
    queue.batch_replied(replacement, batch.batch_id, [0, 10, 20])
    assert await asyncio.gather(*answers) == [[0], [10], [20]]


@in_loop
async def test_inputs_the_sink_cannot_encode_get_400() -> None:
    queue, sink, metrics = new_queue()
    worker = make_worker(queue.spec)
    queue.add_worker(worker)
    sink.cannot_encode(worker, "inputs cannot be sent to m:1: cannot send a value of type set")
    error = await refusal(queue.submit([{1}], within()))
    assert error.status == 400
    assert error.body == {
        "error": "inputs cannot be sent to m:1: cannot send a value of type set",
        "model": "m",
        "version": "1",
    }
    assert batches_counted(metrics, queue.spec) == (0, 0)
    assert described(queue)["active_requests"] == 0


@pytest.mark.parametrize(
    ("kind", "status", "message"),
    [
        (ErrorKind.MODEL, 500, "model 'm:1' raised ZeroDivisionError: division by zero"),
        (ErrorKind.BAD_INPUT, 400, "division by zero"),
        (ErrorKind.BAD_OUTPUT, 500, "division by zero"),
    ],
)
@in_loop
async def test_a_batch_the_worker_could_not_compute_fails_its_requests(
    kind: ErrorKind, status: int, message: str
) -> None:
    queue, sink, _ = new_queue(max_batch_size=2)
    worker = make_worker(queue.spec, capacity=2)
    queue.add_worker(worker)
    failing = queue.submit([0, 0], within())
    fine = queue.submit([1], within())
    queue.batch_failed(
        worker, sink.sent[0].batch_id, RemoteError(kind, "ZeroDivisionError", "division by zero")
    )
    error = await refusal(failing)
    assert (error.status, error.body["error"], error.body["type"]) == (
        status,
        message,
        "ZeroDivisionError",
    )
    queue.batch_replied(worker, sink.sent[1].batch_id, [1])
    assert await fine == [1]


@in_loop
async def test_a_reply_with_the_wrong_number_of_outputs_is_a_500() -> None:
    queue, sink, _ = new_queue()
    worker = make_worker(queue.spec)
    queue.add_worker(worker)
    answer = queue.submit([1, 2], within())
    queue.batch_replied(worker, sink.sent[0].batch_id, [1])
    error = await refusal(answer)
    assert error.status == 500
    assert error.body["error"] == f"{worker.describe()} returned 1 outputs for a batch of 2"


# -- cold starts, the pool, health -----------------------------------------------------------


@in_loop
async def test_a_request_to_a_pool_at_zero_starts_a_cold_start_and_waits_for_it() -> None:
    queue, sink, metrics = new_queue()
    pool = RecordingPool()
    queue.managed_by(pool)
    answer = queue.submit([1], within())
    assert pool.told == [1]  # told at once that a request found no worker
    assert (queue.cold_starts, status.sample(queue).cold_starts) == (1, 1)
    queue.process_started("p-4242")
    assert described(queue)["state"] == "starting"
    queue.submit([2], within())
    assert queue.cold_starts == 1  # one already starting: not another cold start
    worker = make_worker(queue.spec, pid=4242)
    queue.process_ready("p-4242")
    queue.add_worker(worker)
    queue.batch_replied(worker, sink.sent[0].batch_id, [10, 20])
    assert await answer == [10]
    labels = {"model": "m", "version": "1"}
    cold = metrics.registry.get_sample_value("ketch_cold_start_duration_seconds_count", labels)
    assert cold == 1
    assert described(queue)["state"] == "ready"


@pytest.mark.parametrize(
    ("starting", "exit_how", "cause"),
    [
        (False, None, "no worker could start"),
        (True, None, "a worker is still starting"),
        (False, "exit code 1", "no worker could start; the last attempt: exit code 1"),
    ],
)
@in_loop
async def test_a_cold_start_that_takes_too_long_is_a_503_saying_why(
    starting: bool, exit_how: str | None, cause: str
) -> None:
    queue, _, _ = new_queue(cold_start_timeout_s=0.02)
    if exit_how is not None:
        queue.process_started("p-1")
        queue.process_exited("p-1", exit_how, expected=False)
    if starting:
        queue.process_started("p-2")
    error = await refusal(queue.submit([1], within()))
    assert error.status == 503
    assert error.body["error"] == f"model 'm:1' got no worker within 0.02 s ({cause})"
    assert queue.queue_depth == 0


@in_loop
async def test_a_hand_started_model_without_workers_answers_503_at_once() -> None:
    queue, _, _ = new_queue()
    queue.served_from_file = False
    workers = [make_worker(queue.spec), make_worker(queue.spec)]
    for worker in workers:
        queue.add_worker(worker)
    waiting = [queue.submit([n], within()) for n in range(3)]  # two computing, one waiting
    for worker in workers:
        queue.remove_worker(worker, "the worker disconnected")
    # Nobody is left to retry on, nor will anybody come: all three are answered at once.
    for answer in waiting:
        error = await refusal(answer)
        assert error.status == 503
        assert "started by hand and have all left; start one with `ketch worker`" in str(error)
    assert (await refusal(queue.submit([9], within()))).status == 503


@in_loop
async def test_the_pool_hears_of_load_only_when_its_level_changes() -> None:
    queue, sink, _ = new_queue(target_inflight=2)
    pool = RecordingPool()
    queue.managed_by(pool)
    worker = make_worker(queue.spec, capacity=8)
    queue.add_worker(worker)
    assert pool.told == [0]  # a worker came
    answers = [queue.submit([n], within()) for n in range(3)]
    assert pool.told == [0, 1, 3]  # 1 request needs 1 worker, 3 need 2; 2 changed nothing
    for batch in sink.sent:
        queue.batch_replied(worker, batch.batch_id, [0])
    await asyncio.gather(*answers)
    assert pool.told == [0, 1, 3, 2, 0]
    queue.remove_worker(worker, "scaled down")
    assert pool.told[-1] == 0 and len(pool.told) == 6  # a worker went


@in_loop
async def test_an_unhealthy_model_answers_what_waits_and_what_comes_503() -> None:
    queue, _, _ = new_queue()
    waiting = queue.submit([1], within())
    queue.mark_unhealthy("3 workers in a row exited early; the last: exit code 1")
    for answer in (waiting, queue.submit([2], within())):
        error = await refusal(answer)
        assert error.status == 503
        assert "is unhealthy and no longer served: 3 workers in a row exited early" in str(error)
    assert status.sample(queue).healthy is False
    assert described(queue)["state"] == "unhealthy"


@in_loop
async def test_a_crash_looping_model_without_workers_answers_503_until_its_next_attempt() -> None:
    queue, _, _ = new_queue()
    waiting = queue.submit([1], within(60_000))
    next_attempt = time.monotonic() + 5.0
    queue.back_off(Backoff("5 workers in a row exited early", 5, 5.0, next_attempt))
    error = await refusal(waiting)
    assert error.status == 503 and int(error.headers["Retry-After"]) in (4, 5)
    assert "is crash-looping (5 workers in a row exited early)" in str(error)
    fast = await refusal(queue.submit([3], within()))
    assert fast.status == 503 and "the next worker starts in" in str(fast)
    assert described(queue)["state"] == "unhealthy"
    assert described(queue)["backoff"]["quick_exits"] == 5
    assert status.sample(queue).healthy is False
    worker = make_worker(queue.spec)
    queue.add_worker(worker)  # it healed
    assert described(queue)["state"] == "ready" and described(queue)["backoff"] is None


@in_loop
async def test_a_crash_looping_model_with_a_ready_worker_keeps_serving() -> None:
    queue, sink, _ = new_queue()
    worker = make_worker(queue.spec)
    queue.add_worker(worker)
    queue.back_off(Backoff("5 workers in a row exited early", 5, 5.0, time.monotonic() + 5))
    answer = queue.submit([1], within())
    queue.batch_replied(worker, sink.sent[0].batch_id, [2])
    assert await answer == [2]
    assert described(queue)["state"] == "ready" and status.ready_to_serve(queue)


@in_loop
async def test_a_removed_version_answers_404_with_the_reason() -> None:
    queue, _, _ = new_queue()
    queue.removed_because = "model 'm:1' was removed"
    error = await refusal(queue.submit([1], within()))
    assert (error.status, error.body) == (
        404,
        {"error": "model 'm:1' was removed", "model": "m", "version": "1"},
    )


class _Clock:
    """The queue module's ``time``: real monotonic time, plus what the test advanced."""

    def __init__(self) -> None:
        self._offset = 0.0

    def advance(self, seconds: float) -> None:
        self._offset += seconds

    def monotonic(self) -> float:
        return time.monotonic() + self._offset
