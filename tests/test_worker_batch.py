"""Unit tests for ``run_batch`` in ``ketch.zmq_transport.worker``: one REQUEST in, one reply out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

import ketch
from ketch.errors import BatchInputError, BatchOutputError
from ketch.runtimes.python import PythonRuntime
from ketch.types import Outputs
from ketch.worker.predict import batch_predict
from ketch.zmq_transport.protocol import Command, Frame, Message, decode, encode
from ketch.zmq_transport.worker import run_batch

LABEL = "m:1"


def request(batch_id: int, inputs: Any) -> list[bytes]:
    """A REQUEST as the worker's link thread hands it over: ``[head, *buffers]``."""
    return [bytes(frame) for frame in encode(Command.REQUEST, {"id": batch_id, "inputs": inputs})]


def reply_of(frames: Sequence[Frame]) -> Message:
    return decode([bytes(frame) for frame in frames])


def worker_predict(model: Any) -> Any:
    """The batch predict function a worker builds for a decorated ``model``, as ``run`` takes
    it: of the inputs alone (no request parameters)."""
    runtime = PythonRuntime.of(model)
    predict = batch_predict(runtime, runtime.announced_spec(None))
    return lambda inputs: predict(inputs, None)


def run(predict: Any, inputs: Any, batch_id: int = 7) -> Message:
    """``predict(inputs)`` run as the worker runs a REQUEST without parameters."""
    return reply_of(run_batch(request(batch_id, inputs), lambda x, _params: predict(x), LABEL))


# --- REPLY -----------------------------------------------------------------------------------


def test_reply_carries_the_outputs_and_batch_id() -> None:
    message = run(lambda inputs: [x * 2 for x in inputs], [1, 2, 3], batch_id=41)
    assert message.command is Command.REPLY
    compute_s = message.header.pop("compute_s")
    assert message.header == {"id": 41, "outputs": [2, 4, 6]}
    assert 0 <= compute_s < 60


def test_predict_receives_the_decoded_inputs() -> None:
    seen: list[Any] = []

    def predict(inputs: list[Any]) -> Outputs:
        seen.append(inputs)
        return [None] * len(inputs)

    run(predict, [{"text": "hi"}, [1, 2], "x"])
    assert seen == [[{"text": "hi"}, [1, 2], "x"]]


def test_array_outputs_come_back_as_arrays() -> None:
    outputs = np.arange(6, dtype=np.float32).reshape(3, 2)
    message = run(lambda inputs: outputs, [0, 1, 2])
    assert message.command is Command.REPLY
    decoded = message.header["outputs"]
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, outputs)


def test_array_inputs_reach_a_numpy_model_stacked() -> None:
    @ketch.model
    def row_sums(batch: np.ndarray) -> np.ndarray:
        return batch.sum(axis=1)

    inputs = [np.array([1, 2], dtype=np.int32), np.array([3, 4], dtype=np.int32)]
    message = run(worker_predict(row_sums), inputs)
    assert message.command is Command.REPLY
    np.testing.assert_array_equal(message.header["outputs"], [3, 7])


def test_numpy_scalar_outputs_become_numbers() -> None:
    message = run(lambda inputs: [np.float64(0.25), np.int64(3)], [1, 2])
    assert message.header["outputs"] == [0.25, 3]


# --- ERROR -----------------------------------------------------------------------------------


def test_model_exception_becomes_a_model_error() -> None:
    def predict(inputs: list[Any]) -> Outputs:
        raise KeyError("missing feature 'age'")

    message = run(predict, [1], batch_id=9)
    assert message.command is Command.ERROR
    assert message.header == {
        "id": 9,
        "kind": "model",
        "type": "KeyError",
        "message": "\"missing feature 'age'\"",
    }


def test_custom_exception_type_name_is_reported() -> None:
    class WeightsNotLoaded(RuntimeError):
        pass

    def predict(inputs: list[Any]) -> Outputs:
        raise WeightsNotLoaded("call load() first")

    message = run(predict, [1])
    assert message.header["kind"] == "model"
    assert message.header["type"] == "WeightsNotLoaded"
    assert message.header["message"] == "call load() first"


def test_batch_input_error_becomes_bad_input() -> None:
    def predict(inputs: list[Any]) -> Outputs:
        raise BatchInputError("inputs cannot be stacked")

    message = run(predict, [[1, 2], [3]], batch_id=5)
    assert message.command is Command.ERROR
    assert message.header == {
        "id": 5,
        "kind": "bad_input",
        "type": "BatchInputError",
        "message": "inputs cannot be stacked",
    }


def test_ragged_inputs_to_a_numpy_model_become_bad_input() -> None:
    @ketch.model
    def arrays(batch: np.ndarray) -> np.ndarray:
        return batch

    message = run(worker_predict(arrays), [[1, 2], [3]])
    assert message.command is Command.ERROR
    assert message.header["kind"] == "bad_input"
    assert message.header["type"] == "BatchInputError"
    assert "'arrays:1'" in message.header["message"]


def test_batch_output_error_becomes_bad_output() -> None:
    def predict(inputs: list[Any]) -> Outputs:
        raise BatchOutputError("returned 1 outputs for a batch of 2 inputs")

    message = run(predict, [1, 2])
    assert message.command is Command.ERROR
    assert message.header["kind"] == "bad_output"
    assert message.header["type"] == "BatchOutputError"
    assert message.header["message"] == "returned 1 outputs for a batch of 2 inputs"


def test_wrong_output_count_from_a_real_model_becomes_bad_output() -> None:
    @ketch.model
    def short(batch: list[int]) -> list[int]:
        return batch[:1]

    message = run(worker_predict(short), [1, 2, 3])
    assert message.header["kind"] == "bad_output"
    assert "returned 1 outputs for a batch of 3 inputs" in message.header["message"]


class Prediction:
    """A result type a model might forget to convert."""


@pytest.mark.parametrize(
    ("output", "type_name"),
    [(object(), "object"), (Prediction(), "Prediction"), (2**70, "int"), (1 + 1j, "complex")],
)
def test_unsendable_output_becomes_bad_output_not_an_exception(output: Any, type_name: str) -> None:
    message = run(lambda inputs: [output], [1], batch_id=12)
    assert message.command is Command.ERROR
    assert message.header["id"] == 12
    assert message.header["kind"] == "bad_output"
    assert message.header["type"] == "BatchOutputError"
    assert "'m:1'" in message.header["message"]
    assert f"cannot send a value of type {type_name}" in message.header["message"]


def test_unencodable_text_output_becomes_bad_output() -> None:
    message = run(lambda inputs: ["\ud800"], [1])
    assert message.command is Command.ERROR
    assert message.header["kind"] == "bad_output"


def test_a_failed_batch_does_not_affect_the_next() -> None:
    calls = 0

    def flaky(inputs: list[Any]) -> Outputs:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first call fails")
        return inputs

    assert run(flaky, [1], batch_id=1).command is Command.ERROR
    second = run(flaky, [2], batch_id=2)
    assert second.command is Command.REPLY
    assert (second.header["id"], second.header["outputs"]) == (2, [2])


def test_request_parameters_reach_a_function_that_takes_them() -> None:
    @ketch.model
    def tag(texts: list[str], params: list[dict[str, Any]]) -> list[str]:
        return [f"{text}:{p.get('lang', '-')}" for text, p in zip(texts, params, strict=True)]

    runtime = PythonRuntime.of(tag)
    spec = runtime.announced_spec(None)
    assert spec.takes_params
    predict = batch_predict(runtime, spec)
    frames = encode(
        Command.REQUEST, {"id": 3, "inputs": ["a", "b"], "params": [{"lang": "fr"}, {}]}
    )
    message = reply_of(run_batch([bytes(f) for f in frames], predict, LABEL))
    assert message.command is Command.REPLY
    assert message.header["outputs"] == ["a:fr", "b:-"]
