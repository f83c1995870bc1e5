"""The Open Inference Protocol (KServe V2) over REST, spoken to by the official client
(``tritonclient.http`` and its asyncio variant) against a real `ketch serve`."""

from __future__ import annotations

import asyncio
import gzip
import re
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

import ketch
from ketch.inference.tensors import cast_output, v2_datatype_of
from ketch.specs.models import ModelSpec
from tests.conftest import KetchServer

MODELS = """
import numpy as np

import ketch
from ketch import TensorSpec


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


@ketch.model(name="shout", version=2)
def shout_v2(texts: list[str]) -> list[str]:
    return [text.upper() + "!!" for text in texts]


@ketch.model(inputs=[TensorSpec("a", "int64", (2,)), TensorSpec("b", "float64", ())])
def combine(items: list[dict]) -> list[dict]:
    return [{"total": sum(item["a"]) * item["b"], "size": len(item["a"])} for item in items]


@ketch.model(outputs=[TensorSpec("y", "float32", ())])
def halve(xs: list[float]) -> list[float]:
    return [x / 2 for x in xs]


# Whole numbers as Python ints and floats, and 0 or 1 for a bool.
@ketch.model(outputs=[TensorSpec("total", "int64", ()), TensorSpec("positive", "bool", ())])
def tally(rows: list[list[float]]) -> list[dict]:
    return [
        {"total": sum(row) if i % 2 else int(sum(row)), "positive": int(sum(row) > 0)}
        for i, row in enumerate(rows)
    ]


@ketch.model(outputs=[TensorSpec("y", "float32", ())])
def mislabeled(texts: list[str]) -> list[str]:
    return texts
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KetchServer]:
    path = tmp_path_factory.mktemp("oip") / "models.py"
    path.write_text(textwrap.dedent(MODELS))
    served = KetchServer(path)
    try:
        yield served.wait_ready()
    finally:
        served.stop()


@pytest.fixture
def client(server: KetchServer) -> Iterator[triton.InferenceServerClient]:
    triton_client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        yield triton_client
    finally:
        triton_client.close()


def test_health_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata() == {
        "name": "ketch",
        "version": ketch.__version__,
        "extensions": [
            "binary_tensor_data",
            "classification",
            "model_configuration",
            "model_repository",
            "statistics",
            "system_shared_memory",
            "sequence_batching",
        ],
    }


def test_model_metadata_adds_the_batch_axis(client: triton.InferenceServerClient) -> None:
    assert client.get_model_metadata("scale") == {
        "name": "scale",
        "versions": ["1"],
        "platform": "ketch_python",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }
    # Undeclared: read off the type hints.
    shout = client.get_model_metadata("shout", "1")
    assert shout["versions"] == ["1", "2"]
    assert shout["inputs"] == [{"name": "input_0", "datatype": "BYTES", "shape": [-1]}]
    assert shout["outputs"] == [{"name": "output_0", "datatype": "BYTES", "shape": [-1]}]
    combine = client.get_model_metadata("combine")
    assert combine["inputs"] == [
        {"name": "a", "datatype": "INT64", "shape": [-1, 2]},
        {"name": "b", "datatype": "FP64", "shape": [-1]},
    ]
    assert combine["outputs"] == []  # list[dict]: nothing to tell


def test_model_ready(client: triton.InferenceServerClient) -> None:
    assert client.is_model_ready("scale")
    assert client.is_model_ready("shout", "2")
    assert not client.is_model_ready("nope")


def test_infer_a_batch_of_fp32_rows(client: triton.InferenceServerClient) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3) / 3
    tensor = triton.InferInput("x", [4, 3], "FP32")
    tensor.set_data_from_numpy(x, binary_data=False)
    result = client.infer(
        "scale",
        [tensor],
        request_id="req-7",
        outputs=[triton.InferRequestedOutput("y", binary_data=False)],
    )
    y = result.as_numpy("y")
    assert y is not None
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x * 2, rtol=1e-6)
    response = result.get_response()
    assert response["id"] == "req-7"
    assert (response["model_name"], response["model_version"]) == ("scale", "1")


def test_infer_binary_inputs_as_the_client_sends_by_default(
    client: triton.InferenceServerClient,
) -> None:
    x = np.ones((2, 3), dtype=np.float32)
    tensor = triton.InferInput("x", [2, 3], "FP32")
    tensor.set_data_from_numpy(x)  # binary_data=True
    texts = triton.InferInput("input_0", [2], "BYTES")
    texts.set_data_from_numpy(np.array(["é", "b"], dtype=np.object_))
    # Outputs asked for as binary come back binary (the client's default), BYTES as bytes.
    result = client.infer("scale", [tensor], outputs=[triton.InferRequestedOutput("y")])
    assert result.get_output("y")["parameters"] == {"binary_data_size": 2 * 3 * 4}
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2)
    shouted = client.infer("shout", [texts]).as_numpy("output_0")
    assert shouted is not None
    assert shouted.tolist() == ["É!!".encode(), b"B!!"]  # the highest version, as on /models


def test_infer_bytes_per_version(client: triton.InferenceServerClient) -> None:
    texts = triton.InferInput("input_0", [3], "BYTES")
    texts.set_data_from_numpy(np.array(["a", "bc", "hé"], dtype=np.object_), binary_data=False)
    asked = [triton.InferRequestedOutput("output_0", binary_data=False)]
    result = client.infer("shout", [texts], model_version="2", outputs=asked)
    output = result.as_numpy("output_0")
    assert output is not None
    assert output.tolist() == ["A!!", "BC!!", "HÉ!!"]  # JSON's BYTES are text
    assert result.get_response()["model_version"] == "2"


def test_infer_several_inputs_and_named_outputs(client: triton.InferenceServerClient) -> None:
    a = triton.InferInput("a", [2, 2], "INT64")
    a.set_data_from_numpy(np.array([[1, 2], [3, 4]], dtype=np.int64), binary_data=False)
    b = triton.InferInput("b", [2], "FP64")
    b.set_data_from_numpy(np.array([0.5, 2.0]), binary_data=False)
    result = client.infer("combine", [a, b])
    np.testing.assert_array_equal(result.as_numpy("total"), [1.5, 14.0])
    np.testing.assert_array_equal(result.as_numpy("size"), [2, 2])
    only = client.infer(
        "combine", [a, b], outputs=[triton.InferRequestedOutput("size", binary_data=False)]
    )
    assert [o["name"] for o in only.get_response()["outputs"]] == ["size"]


def test_asyncio_client(server: KetchServer) -> None:
    async def infer() -> np.ndarray:
        client = triton_aio.InferenceServerClient(url=server.url.removeprefix("http://"))
        try:
            assert await client.is_model_ready("scale")
            tensor = triton_aio.InferInput("x", [1, 3], "FP32")
            tensor.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.float32))
            result = await client.infer("scale", [tensor])
            output = result.as_numpy("y")
            assert output is not None
            return output
        finally:
            await client.close()

    np.testing.assert_array_equal(asyncio.run(infer()), [[2, 4, 6]])


def test_outputs_are_cast_to_their_declared_datatype(client: triton.InferenceServerClient) -> None:
    x = triton.InferInput("input_0", [3], "FP64")
    x.set_data_from_numpy(np.array([1.0, 3.0, -5.0]), binary_data=False)
    halved = client.infer("halve", [x])
    assert halved.get_output("y")["datatype"] == "FP32"  # Python floats would be FP64
    y = halved.as_numpy("y")
    assert y is not None
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [0.5, 1.5, -2.5])

    rows = triton.InferInput("input_0", [3, 2], "FP64")
    rows.set_data_from_numpy(np.array([[1.0, 2.0], [0.0, 0.0], [-4.0, 1.0]]), binary_data=False)
    as_json = [triton.InferRequestedOutput(n, binary_data=False) for n in ("total", "positive")]
    tallied = client.infer("tally", [rows], outputs=as_json)
    total_tensor = tallied.get_output("total")
    assert total_tensor["datatype"] == "INT64"
    assert total_tensor["data"] == [3, 0, -3]
    assert all(type(n) is int for n in total_tensor["data"])  # 0.0 from the model comes back 0
    total, positive = tallied.as_numpy("total"), tallied.as_numpy("positive")
    assert total is not None and positive is not None
    assert total.dtype == np.int64
    assert total.tolist() == [3, 0, -3]
    assert positive.dtype == np.bool_
    assert positive.tolist() == [True, False, False]


def test_an_output_its_declared_datatype_cannot_hold_is_a_500(
    server: KetchServer, client: triton.InferenceServerClient
) -> None:
    texts = triton.InferInput("input_0", [2], "BYTES")
    texts.set_data_from_numpy(np.array(["a", "b"], dtype=np.object_), binary_data=False)
    with pytest.raises(InferenceServerException) as strings:
        client.infer("mislabeled", [texts])
    assert strings.value.status() == "500"
    assert strings.value.message() == (
        "output 'y' of model 'mislabeled:1' is declared FP32, but the model returned BYTES: "
        "text is no number"
    )
    fraction = _infer(
        server, "tally", {"inputs": [{"name": "r", "shape": [2, 1], "datatype": "FP64",
                                      "data": [1, 2.5]}]},
    )  # fmt: skip
    assert fraction.status_code == 500
    assert fraction.json() == {
        "error": "output 'total' of model 'tally:1' is declared INT64, but the model returned "
        "FP64: values are not whole numbers in its range, such as 2.5",
        "model": "tally",
        "version": "1",
    }
    # The gateway and the model's workers carry on.
    assert _infer(server, "tally", _fp32([1, 1], [2], name="r")).status_code == 200


@pytest.mark.parametrize(
    ("values", "datatype", "cast"),
    [
        ([1.5, 2], "FP32", [1.5, 2.0]),
        ([1, 2.0, -3], "INT64", [1, 2, -3]),
        ([True, False], "INT8", [1, 0]),
        ([0, 1.0], "BOOL", [False, True]),
        ([200], "UINT8", [200]),
        ([np.nan, np.inf], "FP16", [np.nan, np.inf]),
        (["a"], "BYTES", ["a"]),
    ],
)
def test_cast_output_keeps_every_value(values: list[Any], datatype: str, cast: list[Any]) -> None:
    array = cast_output(np.asarray(values), datatype)
    assert v2_datatype_of(array) == datatype
    np.testing.assert_array_equal(array, cast)


@pytest.mark.parametrize(
    ("values", "datatype", "why"),
    [
        ([2.5], "INT64", "not whole numbers in its range, such as 2.5"),
        ([np.nan], "INT32", "not whole numbers in its range, such as nan"),
        ([300], "INT8", "not whole numbers in its range, such as 300"),
        ([-1], "UINT64", "not whole numbers in its range, such as -1"),
        ([0, 2], "BOOL", "not 0 or 1, such as 2"),
        ([1e300], "FP32", "overflow it, such as 1e+300"),
        (["1.5"], "FP32", "text is no number"),
        ([1], "BYTES", "numbers are not text"),
    ],
)
def test_cast_output_refuses_to_change_a_value(values: list[Any], datatype: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        cast_output(np.asarray(values), datatype)


def _infer(server: KetchServer, model: str, body: Any) -> httpx.Response:
    return server.client.post(f"/v2/models/{model}/infer", json=body)


def _fp32(shape: list[int], data: Any, name: str = "x") -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": "FP32", "data": data}]}


@pytest.mark.parametrize(
    ("model", "body", "status", "says"),
    [
        ("nope", _fp32([1, 3], [1, 2, 3]), 404, "Request for unknown model: 'nope' is not found"),
        ("scale", {"inputs": [{"name": "x", "shape": [1], "datatype": "FP8", "data": [1]}]},
         400, "datatype 'FP8' is not supported"),
        ("scale", _fp32([2, 3], [1, 2, 3]), 400, "shape [2, 3] holds 6 elements, data has 3"),
        ("scale", _fp32([1, 3], ["a", "b", "c"]), 400, "cannot hold strings"),
        ("scale", _fp32([1, 2], [1, 2]), 400, "takes inputs of x: float32[3]"),
        ("scale", _fp32([1, 3], [1, 2, 3], name="z"), 400, "missing ['x'], unknown ['z']"),
        ("scale", {"outputs": [{"name": "y"}]}, 400, "needs 'inputs'"),
        ("scale", {"inputs": []}, 400, "needs 'inputs'"),
        ("combine", {"inputs": [{"name": "a", "shape": [1, 2], "datatype": "INT64",
                                 "data": [1, 2]}]}, 400, "missing ['b']"),
        ("combine", {"inputs": [
            {"name": "a", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]},
            {"name": "b", "shape": [2], "datatype": "FP64", "data": [1, 2]}]},
         400, "share their first (batch) dimension"),
        ("scale", {**_fp32([1, 3], [1, 2, 3]), "outputs": [{"name": "w"}]}, 400, "no outputs"),
    ],
)  # fmt: skip
def test_errors_are_json_and_the_gateway_keeps_serving(
    server: KetchServer, model: str, body: Any, status: int, says: str
) -> None:
    response = _infer(server, model, body)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]
    assert _infer(server, "scale", _fp32([1, 3], [[1, 2, 3]])).json()["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 3], "data": [2.0, 4.0, 6.0]}
    ]


def test_unknown_version_and_bad_json(server: KetchServer) -> None:
    assert server.client.get("/v2/models/shout/versions/9").status_code == 404
    ready = server.client.get("/v2/models/shout/versions/9/ready")
    assert ready.status_code == 404
    assert "no version '9'" in ready.json()["error"]
    bad = server.client.post("/v2/models/scale/infer", content=b"{")
    assert bad.status_code == 400
    assert "not valid JSON" in bad.json()["error"]


def test_declared_tensors_are_checked_at_decoration() -> None:
    with pytest.raises(TypeError, match=r"must be a list of ketch\.TensorSpec"):
        one = ketch.TensorSpec("x", "float32", (3,))
        ketch.model(inputs=one)(lambda xs: xs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a numpy dtype name"):
        ketch.model(inputs=[ketch.TensorSpec("x", "float99", (3,))])(lambda xs: xs)
    with pytest.raises(ValueError, match="must have a shape of sizes"):
        ketch.model(inputs=[ketch.TensorSpec("x", "float32", (-2,))])(lambda xs: xs)
    with pytest.raises(ValueError, match="name a tensor twice"):
        ketch.model(outputs=[ketch.TensorSpec("y", "str", ())] * 2)(lambda xs: xs)


def test_declared_tensors_survive_the_wire() -> None:
    @ketch.model(inputs=[ketch.TensorSpec("x", "float32", [3])])  # type: ignore[arg-type]
    def declared(xs: list[list[float]]) -> list[int]:
        return [len(x) for x in xs]

    spec = declared.spec
    assert spec.inputs == (ketch.TensorSpec("x", "float32", (3,)),)
    assert spec.hinted_inputs == (ketch.TensorSpec("input_0", "float64", (-1,)),)
    assert spec.hinted_outputs == (ketch.TensorSpec("output_0", "int64", ()),)
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_declared_inputs_also_check_ketch_predict(server: KetchServer) -> None:
    assert server.predict("scale", {"inputs": [[1, 2, 3]]}).json()["outputs"] == [[2, 4, 6]]
    wrong = server.predict("scale", {"input": [1, 2]})
    assert wrong.status_code == 400
    assert wrong.json()["expected"] == {"shape": [3], "datatype": "float32"}
    assert server.predict("shout", {"input": "hi", "version": "1"}).json()["output"] == "HI!"


def test_client_timeout_parameter(server: KetchServer) -> None:
    body = {**_fp32([1, 3], [1, 2, 3]), "parameters": {"timeout": 5_000_000}}
    assert _infer(server, "scale", body).status_code == 200
    too_short = _infer(server, "scale", {**body, "parameters": {"timeout": 0}})
    assert too_short.status_code == 400


@pytest.mark.parametrize(
    "request_algorithm, response_algorithm", [("gzip", "deflate"), ("deflate", "gzip")]
)
def test_compressed_requests_and_answers(
    client: triton.InferenceServerClient, request_algorithm: str, response_algorithm: str
) -> None:
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    tensor = triton.InferInput("x", [8, 3], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(
        "scale",
        [tensor],
        request_compression_algorithm=request_algorithm,
        response_compression_algorithm=response_algorithm,
    )
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2)


def test_a_compressed_body_is_bounded_once_inflated(tmp_path: Any) -> None:
    path = tmp_path / "models.py"
    path.write_text(textwrap.dedent(MODELS))
    served = KetchServer(path, "--max-body-mb", "1").wait_ready()
    try:
        url = "/v2/models/scale/infer"
        padding = " " * (2 * 2**20)  # JSON whitespace: 2 MiB that gzip makes 2 KiB
        body = '{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]'
        bomb = gzip.compress((body + padding + "}").encode())
        assert len(bomb) < 2**20 // 100
        refused = served.client.post(url, content=bomb, headers={"Content-Encoding": "gzip"})
        assert refused.status_code == 413
        assert "inflates to more than the limit" in refused.json()["error"]
        cut = gzip.compress((body + "}").encode())[:-6]
        broken = served.client.post(url, content=cut, headers={"Content-Encoding": "gzip"})
        assert broken.status_code == 400
        assert "gzip" in broken.json()["error"]
        unknown = served.client.post(url, content=b"x", headers={"Content-Encoding": "br"})
        assert unknown.status_code == 400
        whole = gzip.compress((body + "}").encode())
        answered = served.client.post(
            url, content=whole, headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"}
        )
        assert answered.status_code == 200
        assert answered.headers["content-encoding"] == "gzip"
        assert answered.json()["outputs"][0]["data"] == [2, 4, 6]  # httpx inflates it
    finally:
        served.stop()
