"""The tensorflow runtime against real TensorFlow: tiny SavedModels the test builds (one input,
two named inputs under a non-default signature, strings), served through ketch over HTTP and
compared with what their signatures answer when called directly."""

from __future__ import annotations

import functools
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from ketch.runtimes.tensorflow import TensorFlowRuntime, saved_signature_names
from tests.conftest import KetchServer

ROWS = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [0.0, 0.0, 0.0]]
PAIRS = [{"a": [1.0, 2.0], "b": 3}, {"a": [-0.5, 0.25], "b": -2}, {"a": [0.0, 0.0], "b": 0}]
TEXTS = ["héllo", "", "TensorFlow"]

SERVED = """
import ketch

dense = ketch.deploy("dense", runtime="tensorflow", path="dense", max_batch_size=16, min_replicas=1)
pair = ketch.deploy(
    "pair", runtime="tensorflow", path="pair", signature="score", min_replicas=1, max_delay_ms=20
)
text = ketch.deploy("text", runtime="tensorflow", path="text", min_replicas=1)
# Loaded by a template (preload): it fails once, where failing workers would be restarted
# five times, each importing TensorFlow again.
incomplete = ketch.deploy("incomplete", runtime="tensorflow", path="incomplete", preload=True)
"""

UNKNOWN_SIGNATURE = """
import ketch

pair = ketch.deploy("pair", runtime="tensorflow", path="pair", signature="scores")
"""


class Dense(tf.Module):
    """One input tensor, one output: tanh(x W + b)."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(0)
        self.w = tf.Variable(rng.normal(size=(3, 4)).astype(np.float32))
        self.b = tf.Variable(rng.normal(size=(4,)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def __call__(self, x: Any) -> Any:
        return tf.tanh(tf.matmul(x, self.w) + self.b)


class Pair(tf.Module):
    """Two named inputs and several named outputs, one of them the size of the batch."""

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 2], tf.float32, name="a"),
            tf.TensorSpec([None], tf.int64, name="b"),
        ]
    )
    def score(self, a: Any, b: Any) -> Any:
        size = tf.shape(b, out_type=tf.int64)[0]
        return {
            "total": tf.reduce_sum(a, axis=1) * tf.cast(b, tf.float32),
            "doubled": b * 2,
            "batch": tf.fill(tf.shape(b), size),
        }

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 2], tf.float32, name="a"),
            tf.TensorSpec([None], tf.int64, name="b"),
        ]
    )
    def difference(self, a: Any, b: Any) -> Any:
        return {"difference": a[:, 0] - a[:, 1]}


class Text(tf.Module):
    """A string input: its length in characters and its upper case."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def __call__(self, text: Any) -> Any:
        return {
            "length": tf.strings.length(text, unit="UTF8_CHAR"),
            "upper": tf.strings.upper(text, encoding="utf-8"),
        }


class Shapes(tf.Module):
    """Signatures without a free batch dimension, for the runtime's own chunking."""

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="ids")])
    def lengths(self, ids: Any) -> Any:
        batch = tf.shape(ids)[0]
        return {"sum": tf.reduce_sum(ids, axis=1), "batch": tf.fill([batch], batch)}

    @tf.function(input_signature=[tf.TensorSpec([2, 3], tf.float32, name="x")])
    def pairs_only(self, x: Any) -> Any:
        return tf.reduce_sum(x, axis=1)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.float32, name="values"),
            tf.TensorSpec([], tf.float32, name="scale"),
        ]
    )
    def scaled(self, values: Any, scale: Any) -> Any:
        return {"scaled": values * scale}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tensorflow")
    dense = Dense()
    tf.saved_model.save(dense, str(folder / "dense"), signatures=dense.__call__)
    pair = Pair()
    tf.saved_model.save(
        pair,
        str(folder / "pair"),
        signatures={"serving_default": pair.difference, "score": pair.score},
    )
    text = Text()
    tf.saved_model.save(text, str(folder / "text"), signatures=text.__call__)
    shapes = Shapes()
    tf.saved_model.save(
        shapes,
        str(folder / "shapes"),
        signatures={
            "serving_default": shapes.lengths,
            "pairs_only": shapes.pairs_only,
            "scaled": shapes.scaled,
        },
    )
    # A partial copy: its graph is there, its weights are not, which only TensorFlow can tell.
    shutil.copytree(folder / "dense", folder / "incomplete")
    shutil.rmtree(folder / "incomplete" / "variables")
    (folder / "empty").mkdir()
    (folder / "broken").mkdir()
    (folder / "broken" / "saved_model.pb").write_text("this is not a SavedModel")
    (folder / "model.keras").write_bytes(b"PK")
    (folder / "served.py").write_text(SERVED)
    (folder / "unknown_signature.py").write_text(UNKNOWN_SIGNATURE)
    return folder


@pytest.fixture(scope="module")
def served(folder: Path) -> Iterator[KetchServer]:
    # The --model one (relative to the current folder) starts on its first request.
    server = KetchServer(folder / "served.py", "--model", "cli=tensorflow:dense", cwd=folder)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@functools.cache
def loaded(path: Path) -> Any:
    return tf.saved_model.load(str(path))


def call(folder: Path, model: str, signature: str, **inputs: Any) -> dict[str, np.ndarray]:
    """What the SavedModel's signature answers, called directly in this process."""
    function = loaded(folder / model).signatures[signature]
    spec = function.structured_input_signature[1]
    result = function(**{k: tf.constant(v, dtype=spec[k].dtype) for k, v in inputs.items()})
    return {name: value.numpy() for name, value in result.items()}


def outputs(server: KetchServer, model: str, inputs: Any) -> Any:
    response = server.predict(model, {"inputs": inputs})
    assert response.status_code == 200, response.text
    return response.json()["outputs"]


def refused(server: KetchServer, model: str, inputs: Any) -> str:
    response = server.predict(model, {"inputs": inputs})
    assert response.status_code == 400, response.text
    return str(response.json()["error"])


@pytest.mark.parametrize("model", ["dense", "cli"])
def test_one_input_tensor_answers_a_row_per_input_as_tensorflow_does(
    served: KetchServer, folder: Path, model: str
) -> None:
    expected = call(folder, "dense", "serving_default", x=ROWS)["output_0"]
    np.testing.assert_allclose(outputs(served, model, ROWS), expected, rtol=1e-5, atol=1e-6)
    single = served.predict(model, {"input": {"x": ROWS[1]}}).json()["output"]  # named, too
    np.testing.assert_allclose(single, expected[1], rtol=1e-5, atol=1e-6)


def test_named_inputs_under_a_chosen_signature_answer_a_dict_per_input(
    served: KetchServer, folder: Path
) -> None:
    a, b = [row["a"] for row in PAIRS], [row["b"] for row in PAIRS]
    expected = call(folder, "pair", "score", a=a, b=b)
    answers = outputs(served, "pair", PAIRS)
    assert [sorted(answer) for answer in answers] == [["batch", "doubled", "total"]] * 3
    np.testing.assert_allclose([x["total"] for x in answers], expected["total"], rtol=1e-6)
    assert [x["doubled"] for x in answers] == expected["doubled"].tolist()


def test_string_tensors_take_and_give_python_strings(served: KetchServer, folder: Path) -> None:
    expected = call(folder, "text", "serving_default", text=TEXTS)
    answers = outputs(served, "text", TEXTS)
    assert [x["length"] for x in answers] == expected["length"].tolist() == [5, 0, 10]
    assert [x["upper"] for x in answers] == [s.decode() for s in expected["upper"]]
    assert answers[0]["upper"] == "HÉLLO"


def test_get_models_shows_the_signature_tensors_and_the_runtime(served: KetchServer) -> None:
    status = served.model_status("pair")
    assert status["runtime"] == "tensorflow"
    assert status["artifact"].endswith("pair")
    assert status["options"] == {"signature": "score"}
    assert status["batch_input"] == "list"
    assert status["inputs"] == [
        {"name": "a", "datatype": "float32", "shape": [2]},
        {"name": "b", "datatype": "int64", "shape": []},
    ]
    assert status["outputs"] == [  # by name, as the inputs
        {"name": "batch", "datatype": "int64", "shape": []},
        {"name": "doubled", "datatype": "int64", "shape": []},
        {"name": "total", "datatype": "float32", "shape": []},
    ]
    assert status["runtime_info"] == {"signature": "score", "tensorflow": tf.__version__}
    text = served.model_status("text")
    assert text["inputs"] == [{"name": "text", "datatype": "str", "shape": []}]
    assert {"name": "upper", "datatype": "str", "shape": []} in text["outputs"]
    dense = served.model_status("dense")
    assert dense["inputs"] == [{"name": "x", "datatype": "float32", "shape": [3]}]
    assert dense["outputs"] == [{"name": "output_0", "datatype": "float32", "shape": [4]}]


@pytest.mark.parametrize(
    ("model", "inputs", "message"),
    [
        ("dense", [[1.0, 2.0, 3.0, 4.0]], "input 0: x takes float32[3] per item, got shape [4]"),
        ("dense", [["a", "b", "c"]], "x takes float32[3] per item, got strings"),
        ("dense", [{"y": [1.0, 2.0, 3.0]}], "input 0: an input lacks x"),
        ("pair", [{"a": [1.0, 2.0]}], "takes inputs of {a: float32[2], b: int64[]}; input 0: an"),
        ("pair", [[1.0, 2.0]], "an input must be an object with a, b, got a JSON array"),
        ("pair", [{"a": [1.0], "b": 1}], "a takes float32[2] per item, got shape [1]"),
        # Checked by the runtime in the worker: the gateway lets numbers through to int64.
        ("pair", [{"a": [1.0, 2.0], "b": 1.5}], "input 'b' takes int64[] per item, got numbers"),
        ("pair", [{"a": [[1.0], [2.0, 3.0]], "b": 1}], "got nested lists of uneven lengths"),
        ("text", [3], "text takes str[] per item, got numbers"),
    ],
)
def test_inputs_the_signature_cannot_take_are_a_400_naming_what_it_takes(
    served: KetchServer, model: str, inputs: Any, message: str
) -> None:
    assert message in refused(served, model, inputs)


def test_a_model_serves_on_after_refusing_inputs(served: KetchServer, folder: Path) -> None:
    refused(served, "pair", [{"a": [1.0, 2.0]}])
    expected = call(folder, "pair", "score", a=[PAIRS[0]["a"]], b=[PAIRS[0]["b"]])
    assert outputs(served, "pair", PAIRS[:1])[0]["total"] == pytest.approx(expected["total"][0])


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
    served: KetchServer, folder: Path
) -> None:
    rng = np.random.default_rng(3)
    rows = [
        {"a": rng.normal(size=2).round(3).tolist(), "b": int(rng.integers(-5, 5))}
        for _ in range(48)
    ]
    dense_rows = rng.normal(size=(48, 3)).round(3).tolist()
    with ThreadPoolExecutor(16) as pool:
        pairs = list(pool.map(lambda row: served.predict("pair", {"input": row}), rows))
        denses = list(pool.map(lambda row: served.predict("dense", {"input": row}), dense_rows))
    assert all(r.status_code == 200 for r in pairs + denses)
    got = [r.json()["output"] for r in pairs]
    expected = call(folder, "pair", "score", a=[r["a"] for r in rows], b=[r["b"] for r in rows])
    np.testing.assert_allclose([x["total"] for x in got], expected["total"], rtol=1e-6)
    assert [x["doubled"] for x in got] == expected["doubled"].tolist()
    assert max(x["batch"] for x in got) > 1, "the requests were never batched together"
    np.testing.assert_allclose(
        [r.json()["output"] for r in denses],
        call(folder, "dense", "serving_default", x=dense_rows)["output_0"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_saved_model_tensorflow_cannot_load_is_a_503_with_its_path_and_reason(
    served: KetchServer, folder: Path
) -> None:
    response = served.predict("incomplete", {"input": [1.0, 2.0, 3.0]})
    assert response.status_code == 503
    error = response.json()["error"]
    reason = "cannot load model incomplete:1 (runtime tensorflow, " + str(folder / "incomplete")
    assert reason in error, error
    assert "variables" in error, error  # TensorFlow's own reason
    assert served.model_status("incomplete")["last_error"]


@pytest.mark.parametrize(
    ("source", "model", "message"),
    [
        (None, "missing=tensorflow:nowhere", "no saved model at"),
        (None, "empty=tensorflow:empty", "empty' holds no saved_model.pb"),
        (None, "keras=tensorflow:model.keras", "a Keras file; export a SavedModel with"),
        (None, "broken=tensorflow:broken", "saved_model.pb' is not a SavedModel (wire type"),
        ("unknown_signature.py", None, "has no signature 'scores'; it has: score, serving_default"),
    ],
)
def test_a_path_or_signature_that_is_not_a_saved_model_stops_the_start(
    folder: Path, source: str | None, model: str | None, message: str
) -> None:
    server = KetchServer(source, *(["--model", model] if model else []), cwd=folder)
    try:
        assert server.process.wait(60) == 2
        server.wait_for_stderr(re.escape(message))
    finally:
        server.stop()


def test_signature_names_are_read_from_the_file_as_tensorflow_reads_them(folder: Path) -> None:
    for model in ("dense", "pair", "text", "shapes"):
        signatures = set(loaded(folder / model).signatures)
        assert saved_signature_names(folder / model / "saved_model.pb") == signatures
    assert saved_signature_names(folder / "empty" / "saved_model.pb") is None
    with pytest.raises(ValueError, match="is not a SavedModel"):
        saved_signature_names(folder / "broken" / "saved_model.pb")
    with pytest.raises(ValueError, match="signature must be a signature's name, got 3"):
        TensorFlowRuntime.check(str(folder / "dense"), {"signature": 3})
    with pytest.raises(ValueError, match=r"unknown option\(s\) device"):
        TensorFlowRuntime.check(str(folder / "dense"), {"device": "cpu"})


def test_the_worker_names_the_signatures_when_the_asked_one_is_missing(folder: Path) -> None:
    # check() catches it first, except in the .pbtxt and .cpb forms it does not read.
    with pytest.raises(ValueError, match="has no signature 'nope'; it has: score, serving_default"):
        TensorFlowRuntime(str(folder / "pair"), {"signature": "nope"})


def test_inputs_of_different_lengths_run_in_separate_calls(folder: Path) -> None:
    runtime = TensorFlowRuntime(str(folder / "shapes"), {"signature": "serving_default"})
    assert runtime.inputs[0].shape == (-1,)
    answers = runtime.predict([[1, 2], [3], [4, 5], {"ids": [6]}, [7, 8, 9]])
    assert [x["sum"] for x in answers] == [3, 3, 9, 6, 24]
    assert [x["batch"] for x in answers] == [2, 2, 2, 2, 1]


def test_a_fixed_batch_size_is_fed_in_padded_chunks(folder: Path) -> None:
    runtime = TensorFlowRuntime(str(folder / "shapes"), {"signature": "pairs_only"})
    assert runtime.inputs[0].shape == (3,)
    assert runtime.predict([[1, 2, 3], [4, 5, 6], [7, 8, 9]]) == [6.0, 15.0, 24.0]


def test_a_scalar_input_means_one_call_per_input(folder: Path) -> None:
    runtime = TensorFlowRuntime(str(folder / "shapes"), {"signature": "scaled"})
    assert {t.name: t.shape for t in runtime.inputs} == {"values": (-1,), "scale": ()}
    answers = runtime.predict([{"values": [1, 2], "scale": 2}, {"values": [1, 2, 3], "scale": 0.5}])
    assert answers == [[2.0, 4.0], [0.5, 1.0, 1.5]]  # one output: its value, no dict


def test_a_worker_forked_after_tensorflow_loaded_refuses_to_run(folder: Path) -> None:
    runtime = TensorFlowRuntime(str(folder / "dense"), {})
    runtime._pid = -1  # as in a worker forked from a template (preload=True)
    with pytest.raises(RuntimeError, match=r"deploy this model without preload"):
        runtime.predict([ROWS[0]])
