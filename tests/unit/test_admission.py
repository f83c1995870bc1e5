"""A request's way into a model queue (``ketch.serving.admission``): its deadline, the cache,
numpy stacking and the checks against the tensors a model takes, before anything is queued."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import numpy as np
import pytest

from ketch.observability.metrics import Metrics
from ketch.serving.admission import Deadlines, predict
from ketch.serving.jobs import PredictionError
from ketch.serving.queue import ModelQueue
from ketch.specs.signature import TensorSpec
from tests.unit.fakes import FakeSink, Sent, described, in_loop, make_spec, make_worker

DEADLINES = Deadlines(request_timeout_s=30.0)


class DoublingModel:
    """A queue with one worker that doubles every input, its replies coming from the loop."""

    def __init__(self, **spec: Any) -> None:
        self.sink = FakeSink()
        model = make_spec(**spec)
        metrics = Metrics().for_model(model.name, model.version)
        self.queue = ModelQueue(model, self.sink, itertools.count(1).__next__, metrics)
        self.worker = make_worker(model, capacity=4)
        self.queue.add_worker(self.worker)
        self.sink.on_send = self._answer

    def _answer(self, batch: Sent) -> None:
        inputs = batch.inputs
        outputs = inputs * 2 if isinstance(inputs, np.ndarray) else [2 * x for x in inputs]
        asyncio.get_running_loop().call_soon(
            self.queue.batch_replied, self.worker, batch.batch_id, outputs, None
        )

    async def predict(self, inputs: list[Any]) -> Any:
        return await predict(self.queue, inputs, DEADLINES.deadline(None, None))

    def asked(self) -> list[Any]:
        return [batch.inputs for batch in self.sink.sent]


def test_a_requests_own_timeout_comes_first_then_the_objective_then_the_servers() -> None:
    assert DEADLINES.budget_s(requested_ms=50, objective_ms=200) == 0.05
    assert DEADLINES.budget_s(requested_ms=None, objective_ms=200) == 0.2
    assert DEADLINES.budget_s(requested_ms=None, objective_ms=None) == 30.0
    before = time.monotonic()
    deadline = DEADLINES.deadline(250, None)
    assert deadline.budget_s == 0.25
    assert before + 0.25 <= deadline.at <= time.monotonic() + 0.25


@in_loop
async def test_cached_inputs_are_answered_without_asking_the_model() -> None:
    model = DoublingModel(cache_size=16)
    assert await model.predict([1, 2]) == [2, 4]
    assert await model.predict([2, 3, 1]) == [4, 6, 2]
    assert model.asked() == [[1, 2], [3]]  # only what was not cached yet
    assert await model.predict([3, 3]) == [6, 6]
    assert len(model.asked()) == 2  # every input a hit: nothing queued
    cache = described(model.queue)["cache"]
    assert (cache["hits"], cache["misses"]) == (4, 3)


@in_loop
async def test_a_numpy_models_inputs_become_one_array() -> None:
    model = DoublingModel(batch_input="numpy")
    outputs = await model.predict([[1, 2], [3, 4]])
    (sent,) = model.asked()
    assert isinstance(sent, np.ndarray) and sent.shape == (2, 2)
    np.testing.assert_array_equal(outputs, [[2, 4], [6, 8]])


@pytest.mark.parametrize(
    ("inputs", "why"),
    [
        ([[1, 2], [3]], "cannot be stacked into one array: "),
        ([{"a": 1}], "cannot be stacked into one array: they are not numbers or strings"),
    ],
)
@in_loop
async def test_inputs_that_do_not_stack_are_a_400_and_never_queued(
    inputs: list[Any], why: str
) -> None:
    model = DoublingModel(batch_input="numpy")
    with pytest.raises(PredictionError) as caught:
        await model.predict(inputs)
    assert caught.value.status == 400
    assert f"inputs for model 'm:1' {why}" in caught.value.body["error"]
    assert model.asked() == [] and model.queue.active_requests == 0


@in_loop
async def test_numpy_inputs_of_another_shape_than_the_model_takes_are_a_400() -> None:
    model = DoublingModel(batch_input="numpy", inputs=[TensorSpec("x", "float32", (2,))])
    with pytest.raises(PredictionError) as caught:
        await model.predict([[1, 2, 3]])
    assert caught.value.status == 400
    assert caught.value.body["error"] == (
        "model 'm:1' takes inputs of x: float32[2] each, got int64[3]"
    )
    assert caught.value.body["expected"] == {"shape": [2], "datatype": "float32"}
    assert model.asked() == []


@in_loop
async def test_a_list_input_the_model_cannot_take_is_a_400_naming_it() -> None:
    model = DoublingModel(inputs=[TensorSpec("text", "str", ())])
    with pytest.raises(PredictionError) as caught:
        await model.predict(["fine", 42])
    assert caught.value.status == 400
    assert caught.value.body["error"] == (
        "model 'm:1' takes inputs of {text: str[]}; input 1: text takes str[] per item, got numbers"
    )
    assert model.asked() == []  # the good input is not computed either: the request failed
