"""The Open Inference Protocol over gRPC, spoken to by Triton's own client
(``tritonclient.grpc``: blocking, streaming and asyncio) against a real `ketch serve`."""

from __future__ import annotations

import asyncio
import queue
import textwrap
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

import ketch
from tests.conftest import KetchServer

MODELS = """
import threading

import numpy as np

import ketch
from ketch import TensorSpec

RELEASE = threading.Event()


@ketch.model(
    inputs=[TensorSpec("x", "float32", (3,))],
    outputs=[TensorSpec("y", "float32", (3,))],
    max_batch_size=8,
)
def scale(batch: np.ndarray) -> np.ndarray:
    return batch * 2


@ketch.model
def shout(texts: list[str]) -> list[str]:
    return [text.upper() + "!" for text in texts]


@ketch.model(inputs=[TensorSpec("a", "int64", (2,)), TensorSpec("b", "float64", ())])
def combine(items: list[dict]) -> list[dict]:
    return [{"total": sum(item["a"]) * item["b"], "size": len(item["a"])} for item in items]


@ketch.model(outputs=[TensorSpec("y", "float64", ())])
def inverse(xs: list[float]) -> list[float]:
    return [1 / x if x else float("inf") for x in xs]


@ketch.model(inputs=[TensorSpec("blob", "bytes", ())], outputs=[TensorSpec("back", "bytes", ())])
def reverse(blobs: list[bytes]) -> list[bytes]:
    assert all(type(blob) is bytes for blob in blobs), blobs
    return [blob[::-1] for blob in blobs]


@ketch.model(
    inputs=[TensorSpec("h", "bfloat16", (2,))], outputs=[TensorSpec("doubled", "bfloat16", (2,))]
)
def brain(batch: np.ndarray) -> np.ndarray:
    assert batch.dtype.name == "bfloat16", batch.dtype
    return batch * 2


@ketch.model(
    max_batch_size=0,
    inputs=[TensorSpec("m", "float32", (2, 3))],
    outputs=[TensorSpec("t", "float32", (3, 2))],
)
def transpose(batch: list[list[list[float]]]) -> list[list[list[float]]]:
    assert len(batch) == 1, batch  # no batch axis: one whole tensor per call
    return [np.array(m).T.tolist() for m in batch]


@ketch.model
def tagged(texts: list[str], params: list[dict]) -> list[str]:
    return [f"{text}|{sorted(p.items())}" for text, p in zip(texts, params)]


@ketch.model
def slow(xs: list[float]) -> list[float]:
    RELEASE.wait(2.0)  # longer than the deadlines the tests give it
    return xs
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KetchServer]:
    path = tmp_path_factory.mktemp("grpc") / "models.py"
    path.write_text(textwrap.dedent(MODELS))
    served = KetchServer(path)
    try:
        yield served.wait_ready()
    finally:
        served.stop()


@pytest.fixture
def client(server: KetchServer) -> Iterator[triton.InferenceServerClient]:
    grpc_client = triton.InferenceServerClient(url=server.grpc)
    try:
        yield grpc_client
    finally:
        grpc_client.close()


def _fp32_input(name: str, array: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("scale")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "ketch"
    assert meta["version"] == ketch.__version__
    assert "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("scale", as_json=True)
    assert model["name"] == "scale"
    assert model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "3"]}]
    assert model["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "3"]}]


def test_infer_a_batch_of_rows(client: triton.InferenceServerClient) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    result = client.infer("scale", [_fp32_input("x", x)], request_id="r-1")
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2)
    response = result.get_response(as_json=True)
    assert response["model_name"] == "scale"
    assert response["model_version"] == "1"
    assert response["id"] == "r-1"


def test_bytes_and_several_inputs_and_named_outputs(
    client: triton.InferenceServerClient,
) -> None:
    texts = triton.InferInput("input_0", [2], "BYTES")
    texts.set_data_from_numpy(np.array(["é", "b"], dtype=np.object_))
    shouted = client.infer("shout", [texts]).as_numpy("output_0")
    assert shouted is not None
    assert shouted.tolist() == ["É!".encode(), b"B!"]

    a = triton.InferInput("a", [2, 2], "INT64")
    a.set_data_from_numpy(np.array([[1, 2], [3, 4]], dtype=np.int64))
    b = triton.InferInput("b", [2], "FP64")
    b.set_data_from_numpy(np.array([0.5, 2.0]))
    result = client.infer("combine", [a, b])
    np.testing.assert_array_equal(result.as_numpy("total"), [1.5, 14.0])
    np.testing.assert_array_equal(result.as_numpy("size"), [2, 2])
    only = client.infer("combine", [a, b], outputs=[triton.InferRequestedOutput("size")])
    assert [o["name"] for o in only.get_response(as_json=True)["outputs"]] == ["size"]


def test_bytes_travel_raw_end_to_end(
    client: triton.InferenceServerClient, server: KetchServer
) -> None:
    blobs = np.array([b"\xff\xd8\xff\xe0", b"ab\x00", b""], dtype=np.object_)
    tensor = triton.InferInput("blob", [3], "BYTES")
    tensor.set_data_from_numpy(blobs)
    back = client.infer("reverse", [tensor]).as_numpy("back")
    assert back is not None
    assert back.tolist() == [b"\xe0\xff\xd8\xff", b"\x00ba", b""]
    # Over REST as binary data too; as JSON, bytes that are not text cannot go.
    http = triton_http.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        rest = triton_http.InferInput("blob", [3], "BYTES")
        rest.set_data_from_numpy(blobs)
        answered = http.infer("reverse", [rest]).as_numpy("back")
        assert answered is not None
        assert answered.tolist() == back.tolist()
        as_json = [triton_http.InferRequestedOutput("back", binary_data=False)]
        with pytest.raises(InferenceServerException) as refused:
            http.infer("reverse", [rest], outputs=as_json)
        assert "not UTF-8 text" in refused.value.message()
        # A model taking text gets a 400 for bytes that are not text, naming the way out.
        text = triton_http.InferInput("input_0", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"\xff"], dtype=np.object_))
        with pytest.raises(InferenceServerException) as not_text:
            http.infer("shout", [text])
        assert "must be UTF-8 text" in not_text.value.message()
    finally:
        http.close()


def test_bfloat16_both_ways(client: triton.InferenceServerClient, server: KetchServer) -> None:
    values = np.array([[1.5, -2.0], [0.25, 3.0]], dtype=np.float32)
    tensor = triton.InferInput("h", [2, 2], "BF16")
    tensor.set_data_from_numpy(values.astype(ml_dtypes.bfloat16))
    result = client.infer("brain", [tensor])
    assert result.get_output("doubled").datatype == "BF16"
    doubled = result.as_numpy("doubled")
    assert doubled is not None
    np.testing.assert_array_equal(doubled.astype(np.float32), values * 2)
    # As JSON: numbers for BF16, or FP32 for a BF16 input (the model still gets bfloat16).
    for datatype in ("BF16", "FP32"):
        body = {"inputs": [{"name": "h", "shape": [1, 2], "datatype": datatype, "data": [1, 2]}]}
        answer = server.client.post("/v2/models/brain/infer", json=body)
        assert answer.status_code == 200, answer.text
        (output,) = answer.json()["outputs"]
        assert (output["datatype"], output["data"]) == ("BF16", [2.0, 4.0])


def test_a_model_without_a_batch_axis_takes_tensors_whole(
    client: triton.InferenceServerClient, server: KetchServer
) -> None:
    meta = client.get_model_metadata("transpose", as_json=True)
    assert meta["inputs"] == [{"name": "m", "datatype": "FP32", "shape": ["2", "3"]}]
    config = server.client.get("/v2/models/transpose/config").json()
    assert config["max_batch_size"] == 0
    assert config["input"][0]["dims"] == [2, 3]
    m = np.arange(6, dtype=np.float32).reshape(2, 3)
    result = client.infer("transpose", [_fp32_input("m", m)])
    np.testing.assert_array_equal(result.as_numpy("t"), m.T)
    body = {
        "inputs": [{"name": "m", "shape": [2, 3], "datatype": "FP32", "data": m.ravel().tolist()}]
    }
    answer = server.client.post("/v2/models/transpose/infer", json=body)
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    assert output["shape"] == [3, 2]
    assert output["data"] == m.T.ravel().tolist()


def test_request_parameters_reach_a_model_that_takes_them(
    client: triton.InferenceServerClient, server: KetchServer
) -> None:
    texts = triton.InferInput("input_0", [2], "BYTES")
    texts.set_data_from_numpy(np.array(["a", "b"], dtype=np.object_))
    tagged = client.infer("tagged", [texts], parameters={"lang": "fr", "n": 3}).as_numpy("output_0")
    assert tagged is not None
    assert tagged.tolist() == [b"a|[('lang', 'fr'), ('n', 3)]", b"b|[('lang', 'fr'), ('n', 3)]"]
    # Over REST as well, and with none (an empty dict) on ketch's own route.
    http = triton_http.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        rest = triton_http.InferInput("input_0", [1], "BYTES")
        rest.set_data_from_numpy(np.array(["c"], dtype=np.object_))
        answered = http.infer("tagged", [rest], parameters={"lang": "en"}).as_numpy("output_0")
        assert answered is not None
        assert answered.tolist() == [b"c|[('lang', 'en')]"]
        # A model that takes no parameters refuses them, naming them, over both protocols.
        shout = triton_http.InferInput("input_0", [1], "BYTES")
        shout.set_data_from_numpy(np.array(["x"], dtype=np.object_))
        with pytest.raises(InferenceServerException) as refused:
            http.infer("shout", [shout], parameters={"my_param": 1})
        assert "takes no request parameters, got ['my_param']" in refused.value.message()
    finally:
        http.close()
    with pytest.raises(InferenceServerException) as refused_grpc:
        client.infer("shout", [texts], parameters={"my_param": 1})
    assert refused_grpc.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert server.predict("tagged", {"input": "d"}).json()["output"] == "d|[]"


def test_class_count_gives_the_top_classes(
    client: triton.InferenceServerClient, server: KetchServer
) -> None:
    x = np.array([[0.5, 3.0, 1.0], [2.0, -1.0, 0.0]], dtype=np.float32)
    asked = [triton.InferRequestedOutput("y", class_count=2)]
    classes = client.infer("scale", [_fp32_input("x", x)], outputs=asked).as_numpy("y")
    assert classes is not None
    assert classes.tolist() == [[b"6.000000:1", b"2.000000:2"], [b"4.000000:0", b"0.000000:2"]]
    http = triton_http.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        tensor = triton_http.InferInput("x", [2, 3], "FP32")
        tensor.set_data_from_numpy(x)
        rest_asked = [triton_http.InferRequestedOutput("y", class_count=1, binary_data=False)]
        top = http.infer("scale", [tensor], outputs=rest_asked).as_numpy("y")
        assert top is not None
        assert top.tolist() == [["6.000000:1"], ["4.000000:0"]]
    finally:
        http.close()


def test_outputs_json_cannot_carry_travel_raw(client: triton.InferenceServerClient) -> None:
    x = triton.InferInput("input_0", [3], "FP64")
    x.set_data_from_numpy(np.array([2.0, 0.0, -4.0]))
    y = client.infer("inverse", [x]).as_numpy("y")
    assert y is not None
    assert y.tolist() == [0.5, float("inf"), -0.25]


def test_errors_carry_the_status_and_message_of_the_http_ones(
    client: triton.InferenceServerClient, server: KetchServer
) -> None:
    x = np.ones((1, 3), dtype=np.float32)
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", [_fp32_input("x", x)])
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'nope' is not found" in unknown.value.message()
    with pytest.raises(InferenceServerException) as wrong_name:
        client.infer("scale", [_fp32_input("z", x)])
    assert wrong_name.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "missing ['x']" in wrong_name.value.message()
    wrong_type = triton.InferInput("x", [1, 3], "INT32")
    wrong_type.set_data_from_numpy(np.ones((1, 3), dtype=np.int32))
    with pytest.raises(InferenceServerException) as refused:
        client.infer("scale", [wrong_type])
    assert "is FP32, got INT32" in refused.value.message()
    with pytest.raises(InferenceServerException) as version:
        client.infer("scale", [_fp32_input("x", x)], model_version="7")
    assert version.value.status() == "StatusCode.NOT_FOUND"
    # Nothing lost: both protocols still answer.
    np.testing.assert_array_equal(client.infer("scale", [_fp32_input("x", x)]).as_numpy("y"), x * 2)
    assert server.predict("shout", {"input": "ok"}).json()["output"] == "OK!"


def test_deadlines_from_the_grpc_deadline_and_the_timeout_parameter(
    client: triton.InferenceServerClient,
) -> None:
    x = triton.InferInput("input_0", [1], "FP64")
    x.set_data_from_numpy(np.array([1.0]))
    with pytest.raises(InferenceServerException) as late:
        client.infer("slow", [x], client_timeout=0.3)
    assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    with pytest.raises(InferenceServerException) as timed_out:
        client.infer("slow", [x], timeout=200_000)  # microseconds, as Triton takes them
    assert timed_out.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "deadline" in timed_out.value.message()


def test_stream_answers_every_request_and_its_errors(
    client: triton.InferenceServerClient,
) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(5):
            x = np.full((1, 3), i, dtype=np.float32)
            client.async_stream_infer("scale", [_fp32_input("x", x)], request_id=str(i))
        client.async_stream_infer(
            "scale", [_fp32_input("bad", np.ones((1, 3), np.float32))], request_id="bad"
        )
        got: dict[str, Any] = {}
        errors = []
        for _ in range(6):
            result, error = answers.get(timeout=30)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result.as_numpy("y")
    finally:
        client.stop_stream()
    assert sorted(got) == ["0", "1", "2", "3", "4"]
    for key, y in got.items():
        np.testing.assert_array_equal(y, np.full((1, 3), 2 * int(key), dtype=np.float32))
    assert len(errors) == 1
    assert "missing ['x']" in str(errors[0])


def test_asyncio_client(server: KetchServer) -> None:
    async def infer() -> list[np.ndarray]:
        client = triton_aio.InferenceServerClient(url=server.grpc)
        try:
            assert await client.is_model_ready("scale")
            x = triton_aio.InferInput("x", [1, 3], "FP32")
            x.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.float32))
            results = await asyncio.gather(*(client.infer("scale", [x]) for _ in range(8)))
            return [r.as_numpy("y") for r in results]
        finally:
            await client.close()

    for y in asyncio.run(infer()):
        np.testing.assert_array_equal(y, [[2, 4, 6]])


def test_grpc_calls_are_counted_with_the_http_ones(
    client: triton.InferenceServerClient, server: KetchServer
) -> None:
    def counted() -> float:
        text = server.client.get("/metrics").text
        line = 'ketch_requests_total{model="scale",status="200",version="1"}'
        found = [row for row in text.splitlines() if row.startswith(line)]
        return float(found[0].split()[-1]) if found else 0.0

    before = counted()
    x = np.ones((1, 3), dtype=np.float32)
    for _ in range(3):
        client.infer("scale", [_fp32_input("x", x)])
    assert counted() == before + 3


def test_tokens_guard_grpc_as_they_guard_http(tmp_path: Any) -> None:
    path = tmp_path / "models.py"
    path.write_text(textwrap.dedent(MODELS))
    served = KetchServer(path, "--predict-token", "p-secret").wait_ready()
    try:
        client = triton.InferenceServerClient(url=served.grpc)
        try:
            assert client.is_server_live()  # the health methods are open
            x = np.ones((1, 3), dtype=np.float32)
            with pytest.raises(InferenceServerException) as refused:
                client.infer("scale", [_fp32_input("x", x)])
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
            assert "predict token" in refused.value.message()
            with pytest.raises(InferenceServerException):
                client.infer(
                    "scale", [_fp32_input("x", x)], headers={"authorization": "Bearer wrong"}
                )
            good = {"authorization": "Bearer p-secret"}
            y = client.infer("scale", [_fp32_input("x", x)], headers=good).as_numpy("y")
            np.testing.assert_array_equal(y, x * 2)
        finally:
            client.close()
    finally:
        served.stop()


def test_grpc_port_in_use_fails_at_start(server: KetchServer, tmp_path: Any) -> None:
    port = server.grpc.rpartition(":")[2]
    served = KetchServer(tmp_path / "none.py", "--grpc-port", port)
    try:
        assert served.process.wait(60) == 2
        assert any("cannot listen for gRPC" in line for line in served.stderr_lines)
    finally:
        served.stop()


def test_grpc_off(tmp_path: Any) -> None:
    path = tmp_path / "models.py"
    path.write_text(textwrap.dedent(MODELS))
    served = KetchServer(path, "--grpc-port", "off").wait_ready()
    try:
        assert served.grpc == ""
        assert served.predict("shout", {"input": "a"}).json()["output"] == "A!"
    finally:
        served.stop()


def test_model_config_over_both_protocols(
    client: triton.InferenceServerClient, server: KetchServer
) -> None:
    over_http = server.client.get("/v2/models/scale/config")
    assert over_http.status_code == 200
    config = over_http.json()
    assert config["name"] == "scale"
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [3]}]
    assert config["output"] == [{"name": "y", "data_type": "TYPE_FP32", "dims": [3]}]
    assert config["instance_group"] == [{"name": "scale", "count": 1, "kind": "KIND_CPU"}]
    assert "max_queue_delay_microseconds" in config["dynamic_batching"]
    over_grpc = client.get_model_config("scale", as_json=True)["config"]
    assert over_grpc["max_batch_size"] == 8
    assert over_grpc["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": ["3"]}]
    assert over_grpc["instance_group"][0]["count"] == 1
    assert server.client.get("/v2/models/nope/config").status_code == 404
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_config("nope")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"


def test_statistics_count_what_was_served(
    client: triton.InferenceServerClient, server: KetchServer
) -> None:
    def stats_of(name: str) -> dict[str, Any]:
        answer = server.client.get(f"/v2/models/{name}/versions/1/stats")
        assert answer.status_code == 200, answer.text
        (entry,) = answer.json()["model_stats"]
        return entry  # type: ignore[no-any-return]

    before = stats_of("combine")
    a = triton.InferInput("a", [3, 2], "INT64")
    a.set_data_from_numpy(np.ones((3, 2), dtype=np.int64))
    b = triton.InferInput("b", [3], "FP64")
    b.set_data_from_numpy(np.ones(3))
    for _ in range(2):
        client.infer("combine", [a, b])
    bad = triton.InferInput("a", [3, 2], "INT64")
    bad.set_data_from_numpy(np.ones((3, 2), dtype=np.int64))
    with pytest.raises(InferenceServerException):
        client.infer("combine", [bad])  # refused before it reached the queue: not counted
    after = stats_of("combine")
    assert after["inference_count"] - before["inference_count"] == 6  # items, as Triton counts
    stats, was = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] - was["success"]["count"] == 2
    assert stats["success"]["ns"] > was["success"]["ns"]
    assert stats["queue"]["count"] - was["queue"]["count"] == 2
    assert after["execution_count"] > before["execution_count"]
    assert stats["compute_infer"]["ns"] > was["compute_infer"]["ns"]
    assert any(b["batch_size"] == 3 for b in after["batch_stats"])
    assert after["last_inference"] > 0

    # Triton's client reads the same over gRPC, for one model or all of them.
    one = client.get_inference_statistics("combine", as_json=True)["model_stats"]
    assert [(s["name"], s["version"]) for s in one] == [("combine", "1")]
    assert int(one[0]["inference_count"]) == after["inference_count"]
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {s["name"] for s in every} == {
        "scale",
        "shout",
        "combine",
        "inverse",
        "reverse",
        "brain",
        "transpose",
        "tagged",
        "slow",
    }
    everything = server.client.get("/v2/models/stats").json()["model_stats"]
    assert len(everything) == len(every)
    assert server.client.get("/v2/models/nope/stats").status_code == 404
