"""Dispatcher in process: the broker's events reach the right queue, versions and defaults,
removal while requests drain, workers of removed or unknown models, local process exits.

The FakeSink stands in for the broker: ``sink.join`` is a worker's READY, its ``drop`` tells a
worker to leave and reports it lost, as the broker's does.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ketch.observability.events import Event
from ketch.serving import status
from ketch.serving.admission import Deadlines
from ketch.serving.dispatcher import Dispatcher, version_order
from ketch.serving.jobs import Deadline, PredictionError
from ketch.serving.sink import Worker
from ketch.specs.models import ModelSpec
from ketch.specs.signature import TensorSpec
from ketch.zmq_transport.broker import RemoteError
from ketch.zmq_transport.protocol import ErrorKind
from tests.unit.fakes import (
    FakeSink,
    batches_counted,
    described,
    in_loop,
    make_spec,
    make_worker,
    receiver_of,
)


def within(ms: float | None = None) -> Deadline:
    return Deadlines(request_timeout_s=30.0).deadline(ms, None)


class Gateway:
    """A dispatcher attached to a fake broker, with the events it reported."""

    def __init__(self, *, allow_worker_models: bool = False) -> None:
        self.events: list[Event] = []
        self.dispatcher = Dispatcher(self.events.append, allow_worker_models=allow_worker_models)
        self.sink = FakeSink(self.dispatcher)
        self.dispatcher.attach(self.sink)

    def serve(self, *specs: ModelSpec) -> None:
        for spec in specs:
            self.dispatcher.add_model(spec)

    def ready(self, spec: ModelSpec, **worker: Any) -> Worker:
        return self.sink.join(make_worker(spec, **worker))

    def ask(self, name: str, inputs: list[Any], version: str | None = None) -> Any:
        return self.dispatcher.queue_for(name, version).submit(inputs, within())

    def reply(self, index: int, outputs: list[Any]) -> None:
        """The worker of the ``index``-th batch sent answers it."""
        batch = self.sink.sent[index]
        receiver_of(batch.worker).batch_replied(batch.worker, batch.batch_id, outputs, 0.001)

    def kinds(self) -> list[str]:
        return [event.kind for event in self.events]


V1, V2, V10 = (make_spec(version=v) for v in ("1", "2", "10"))


def test_versions_sort_as_numbers() -> None:
    versions = ["10", "9", "1.10", "1.9", "2-rc"]
    assert sorted(versions, key=version_order) == ["1.9", "1.10", "2-rc", "9", "10"]


@in_loop
async def test_replies_reach_the_queue_of_the_workers_model_version() -> None:
    gateway = Gateway()
    other = make_spec(name="other")
    gateway.serve(V1, V2, other)
    for spec in (V1, V2, other):
        gateway.ready(spec)
    answers = {
        "m:1": gateway.ask("m", [1], "1"),
        "m:2": gateway.ask("m", [2], "2"),
        "other:1": gateway.ask("other", [3]),
    }
    assert [batch.worker.spec.label() for batch in gateway.sink.sent] == list(answers)
    for index in reversed(range(3)):
        batch = gateway.sink.sent[index]
        gateway.reply(index, [f"{batch.worker.spec.label()} says {batch.inputs[0]}"])
    assert {label: await answer for label, answer in answers.items()} == {
        "m:1": ["m:1 says 1"],
        "m:2": ["m:2 says 2"],
        "other:1": ["other:1 says 3"],
    }
    assert batches_counted(gateway.dispatcher.metrics, V2) == (1, 1)


@in_loop
async def test_an_error_reaches_the_requests_of_its_batch_only() -> None:
    gateway = Gateway()
    gateway.serve(V1)
    worker = gateway.ready(V1, capacity=2)
    failing = gateway.ask("m", ["x"])
    fine = gateway.ask("m", [1])
    failed = gateway.sink.sent[0]
    error = RemoteError(ErrorKind.MODEL, "KeyError", "'x'")
    receiver_of(worker).batch_failed(worker, failed.batch_id, error)
    gateway.reply(1, [2])
    with pytest.raises(PredictionError) as caught:
        await failing
    assert (caught.value.status, caught.value.body["type"]) == (500, "KeyError")
    assert await fine == [2]


def test_unknown_models_and_versions_are_404s_that_list_what_is_served() -> None:
    gateway = Gateway()
    gateway.serve(V1, V2)
    with pytest.raises(PredictionError) as unknown:
        gateway.dispatcher.queue_for("nope", None)
    assert (unknown.value.status, unknown.value.body["models"]) == (404, ["m"])
    with pytest.raises(PredictionError) as no_version:
        gateway.dispatcher.queue_for("m", "3")
    assert no_version.value.status == 404
    assert no_version.value.body == {
        "error": "model 'm' has no version '3'",
        "model": "m",
        "versions": ["1", "2"],
    }


def test_requests_without_a_version_go_to_the_highest_until_one_is_pinned() -> None:
    gateway = Gateway()
    dispatcher = gateway.dispatcher
    gateway.serve(V2, V10, V1)
    assert dispatcher.default_version("m") == "10"
    assert dispatcher.queue_for("m", None).spec.version == "10"
    assert dispatcher.set_default("m", "2") == "10"
    gateway.serve(make_spec(version="11"))  # a higher version added later takes no traffic
    assert dispatcher.queue_for("m", None).spec.version == "2"
    assert [m.version for m in dispatcher.describe() if m.default] == ["2"]
    assert dispatcher.versions("m") == ["1", "2", "10", "11"]


def test_pin_default_keeps_the_current_default_when_a_higher_version_comes() -> None:
    gateway = Gateway()
    gateway.serve(V1)
    gateway.dispatcher.pin_default("m")
    gateway.serve(V2)
    assert gateway.dispatcher.default_version("m") == "1"


@in_loop
async def test_a_roll_sends_new_requests_to_the_new_version_while_queued_ones_finish() -> None:
    gateway = Gateway()
    gateway.serve(V1)
    gateway.dispatcher.pin_default("m")
    gateway.serve(V2)
    old, new = gateway.ready(V1), gateway.ready(V2)
    before = gateway.ask("m", [1])
    assert gateway.dispatcher.set_default("m", "2") == "1"
    after = gateway.ask("m", [2])
    assert [batch.worker for batch in gateway.sink.sent] == [old, new]
    gateway.reply(0, ["v1"])
    gateway.reply(1, ["v2"])
    assert (await before, await after) == (["v1"], ["v2"])


@in_loop
async def test_a_removed_version_drains_its_queue_and_takes_no_new_request() -> None:
    gateway = Gateway()
    dispatcher = gateway.dispatcher
    gateway.serve(V1, V2)
    gateway.ready(V2)
    answer = gateway.ask("m", [1], "2")
    queue = dispatcher.remove_model(("m", "2"), "model 'm' version '2' was removed")
    assert dispatcher.default_version("m") == "1"
    assert not dispatcher.has_model(("m", "2"))
    with pytest.raises(PredictionError) as gone:
        dispatcher.queue_for("m", "2")
    assert gone.value.status == 404
    refused = queue.submit([2], within())  # a request that had looked it up just before
    with pytest.raises(PredictionError) as late:
        await refused
    assert (late.value.status, late.value.body["error"]) == (
        404,
        "model 'm' version '2' was removed",
    )
    drained = asyncio.ensure_future(queue.wait_drained(1.0))
    gateway.reply(0, ["still answered"])  # its worker's reply still reaches the queue
    assert await answer == ["still answered"]
    assert await drained is True
    assert dispatcher.versions("m") == ["1"]


@in_loop
async def test_a_worker_of_a_removed_model_is_sent_away_when_it_joins() -> None:
    gateway = Gateway()
    gateway.serve(V1, V2)
    gateway.dispatcher.remove_model(("m", "2"), "removed")
    gateway.dispatcher.forget(("m", "2"))
    late = gateway.ready(V2)
    assert gateway.sink.refused_ready == [(late, "model 'm:2' was removed")]
    assert list(gateway.sink.workers()) == []
    assert not gateway.dispatcher.has_model(("m", "2"))
    assert "model_ready" not in gateway.kinds()
    assert gateway.kinds()[-1] == "worker_refused"


def test_removing_every_version_forgets_the_model_and_its_pinned_default() -> None:
    gateway = Gateway()
    dispatcher = gateway.dispatcher
    gateway.serve(V1, V2)
    dispatcher.set_default("m", "1")
    dispatcher.remove_model(("m", "1"), "removed")
    assert dispatcher.default_version("m") == "2"  # the pin went with its version
    dispatcher.remove_model(("m", "2"), "removed")
    assert not dispatcher.knows_model("m")
    assert dispatcher.default_version("m") is None
    for version in ("1", "2"):
        dispatcher.forget(("m", version))  # drained
    gateway.serve(V1)  # added again afresh
    assert dispatcher.knows_model("m") and dispatcher.default_version("m") == "1"


def test_a_worker_of_a_model_not_served_is_refused_once_said() -> None:
    gateway = Gateway()
    gateway.serve(V1)
    first = gateway.ready(make_spec(name="by-hand"), host="elsewhere")
    for _ in range(2):
        gateway.ready(make_spec(name="by-hand"), host="elsewhere")
    reason = gateway.sink.refused_ready[0][1]
    assert reason.startswith("this gateway does not serve model 'by-hand:1' (it serves: m:1)")
    assert [refused for _, refused in gateway.sink.refused_ready] == [reason] * 3
    assert not gateway.dispatcher.knows_model("by-hand")
    # Said once per host, model and reason; counted every time.
    assert gateway.kinds() == ["worker_refused"]
    assert gateway.events[0].fields == {"peer": first.describe(), "reason": reason}
    refused = gateway.dispatcher.metrics.registry.get_sample_value(
        "ketch_broker_refused_total", {"stage": "admission"}
    )
    assert refused == 3


def test_a_worker_whose_tensors_differ_from_the_declared_ones_is_refused() -> None:
    gateway = Gateway()
    x3, x5 = TensorSpec("x", "float32", (3,)), TensorSpec("x", "float32", (5,))
    gateway.serve(make_spec(inputs=[x3]))
    gateway.ready(make_spec(inputs=[x5]))
    assert gateway.sink.refused_ready[0][1] == (
        "its inputs (x: float32[5]) are not the inputs of model 'm:1' (x: float32[3])"
    )
    gateway.ready(make_spec())  # a runtime that cannot tell agrees with any tensors
    assert gateway.dispatcher.queue_for("m", None).spec.inputs == (x3,)
    assert gateway.dispatcher.queue_for("m", None).ready_replicas == 1


def test_tensors_learnt_from_the_first_worker_are_the_ones_later_workers_must_have() -> None:
    gateway = Gateway()
    gateway.serve(V1)
    y2, y4 = TensorSpec("y", "float32", (2,)), TensorSpec("y", "float32", (4,))
    gateway.ready(make_spec(outputs=[y2]))
    gateway.ready(make_spec(outputs=[y4]))
    assert gateway.sink.refused_ready[0][1].startswith("its outputs (y: float32[4]) are not")
    assert gateway.dispatcher.queue_for("m", None).spec.outputs == (y2,)


@in_loop
async def test_with_allow_worker_models_a_worker_serves_its_model_until_it_leaves() -> None:
    gateway = Gateway(allow_worker_models=True)
    dispatcher = gateway.dispatcher
    hand_started = make_spec(name="by-hand")
    assert not dispatcher.knows_model("by-hand")
    worker = gateway.ready(hand_started, host="elsewhere")
    assert dispatcher.knows_model("by-hand")
    answer = gateway.ask("by-hand", [1])
    gateway.reply(0, [2])
    assert await answer == [2]
    assert dispatcher.not_ready() == []  # not from the served file: not waited for
    gateway.sink.drop(worker, "the worker disconnected")
    assert not dispatcher.knows_model("by-hand")
    with pytest.raises(PredictionError) as gone:
        gateway.ask("by-hand", [1])
    assert gone.value.status == 404
    assert gateway.kinds() == ["model_ready", "worker_lost", "model_removed"]
    gateway.ready(hand_started, host="elsewhere")  # it may come back
    assert dispatcher.knows_model("by-hand")


def test_a_worker_teaches_its_queue_the_tensors_its_runtime_found() -> None:
    gateway = Gateway()
    gateway.serve(V1)
    x = TensorSpec("x", "float32", (3,))
    gateway.ready(make_spec(inputs=[x], runtime_info={"framework": "torch"}))
    queue = gateway.dispatcher.queue_for("m", None)
    assert queue.spec.inputs == (x,)
    assert described(queue)["inputs"] == [{"name": "x", "datatype": "float32", "shape": [3]}]
    assert queue.spec.runtime_info == {"framework": "torch"}


@in_loop
async def test_a_local_process_is_starting_until_its_worker_is_ready() -> None:
    gateway = Gateway()
    dispatcher = gateway.dispatcher
    dispatcher.add_model(V1)  # as the pool manager does before it starts a process
    dispatcher.process_started(V1, "p-501")
    queue = dispatcher.queue_for("m", None)
    assert (status.state_of(queue), status.sample(queue).starting) == ("starting", 1)
    assert not dispatcher.settled()
    gateway.ready(V1, pid=501, host="elsewhere")  # the same pid, started by hand elsewhere
    assert queue.starting == {"p-501"}
    gateway.ready(V1, pid=501, launch="p-501")
    assert (queue.starting, status.state_of(queue), queue.ready_replicas) == (
        frozenset(),
        "ready",
        2,
    )
    assert dispatcher.settled()


@in_loop
async def test_a_local_process_exit_drops_its_worker_and_its_batch_is_retried() -> None:
    gateway = Gateway()
    dispatcher = gateway.dispatcher
    gateway.serve(V1)
    dispatcher.process_started(V1, "p-501")
    crashed = gateway.ready(V1, pid=501, launch="p-501")
    remote_twin = gateway.ready(V1, pid=501, host="elsewhere")
    answer = gateway.ask("m", [1])
    assert gateway.sink.sent[0].worker is crashed
    dispatcher.process_exited(V1, "p-501", "killed by SIGKILL", False)
    assert gateway.sink.dropped == [(crashed, "killed by SIGKILL")]
    assert gateway.sink.sent[1].worker is remote_twin  # retried at once, not at a timeout
    gateway.reply(1, ["retried"])
    assert await answer == ["retried"]
    queue = dispatcher.queue_for("m", None)
    assert (queue.worker_exits, queue.last_error) == (1, "killed by SIGKILL")
    assert list(gateway.sink.workers()) == [remote_twin]


@in_loop
async def test_a_recycled_worker_fails_its_batches_without_retrying_them() -> None:
    gateway = Gateway()
    gateway.serve(V1)
    gateway.ready(V1, pid=601, launch="p-601")
    other = gateway.ready(V1)
    answer = gateway.ask("m", [1])
    gateway.dispatcher.recycle(V1, "p-601", "over its memory_mb of 100 (230 MB)")
    with pytest.raises(PredictionError) as caught:
        await answer
    assert caught.value.body == {
        "error": "over its memory_mb of 100 (230 MB)",
        "model": "m",
        "version": "1",
    }
    assert caught.value.status == 503
    assert gateway.sink.sent_to(other) == []
    assert [w.pid for w in gateway.sink.workers()] == [other.pid]


@in_loop
async def test_a_failed_send_drops_the_worker_from_the_loop_and_another_answers() -> None:
    gateway = Gateway()
    gateway.serve(V1)
    unreachable, other = gateway.ready(V1), gateway.ready(V1)
    gateway.sink.refuse(unreachable)
    answer = gateway.ask("m", [1])
    assert gateway.sink.dropped == []  # not reported from inside the send...
    await asyncio.sleep(0)
    assert gateway.sink.dropped == [(unreachable, "cannot deliver to it")]  # ...but right after
    assert gateway.kinds()[-1] == "worker_lost"
    gateway.reply(0, ["from the other"])
    assert gateway.sink.sent[0].worker is other
    assert await answer == ["from the other"]
    assert status.sample(gateway.dispatcher.queue_for("m", None)).ready == 1


def test_retire_all_tells_every_worker_of_a_version_to_leave() -> None:
    gateway = Gateway()
    gateway.serve(V1, V2)
    leaving = [gateway.ready(V1), gateway.ready(V1, host="elsewhere")]
    staying = gateway.ready(V2)
    assert gateway.dispatcher.retire_all(("m", "1"), "removed") == leaving
    assert [worker for worker, _ in gateway.sink.dropped] == leaving
    assert list(gateway.sink.workers()) == [staying]
    assert gateway.dispatcher.queue_for("m", "1").ready_replicas == 0


def test_a_removed_models_template_exiting_does_not_bring_the_model_back() -> None:
    gateway = Gateway()
    dispatcher = gateway.dispatcher
    preloaded = make_spec(preload=True)
    gateway.serve(preloaded)
    dispatcher.template_changed(preloaded, {"pid": 700, "state": "ready", "rss_mb": 50.0})
    dispatcher.remove_model(preloaded.key, "model 'm' version '1' was removed")
    dispatcher.forget(preloaded.key)  # drained and released: its template is terminated
    dispatcher.template_changed(preloaded, None)  # ...and the supervisor reports its exit
    assert not dispatcher.knows_model("m")
    assert dispatcher.describe() == []
