"""KServe V1 / TensorFlow Serving REST (``/v1/models/{name}:predict``) against a real
`ketch serve`, as a TensorFlow Serving client sends it."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import pytest

from tests.conftest import KetchServer

MODELS = """
import ketch


@ketch.model
def double(xs: list[float]) -> list[float]:
    return [2 * x for x in xs]


@ketch.model(name="double", version=2)
def triple(xs: list[float]) -> list[float]:
    return [3 * x for x in xs]


@ketch.model
def describe(items: list[dict]) -> list[dict]:
    return [{"sum": item["a"] + item["b"], "label": f"{item['a']}+{item['b']}"} for item in items]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KetchServer]:
    path = tmp_path_factory.mktemp("v1") / "models.py"
    path.write_text(textwrap.dedent(MODELS))
    served = KetchServer(path)
    try:
        yield served.wait_ready()
    finally:
        served.stop()


def test_instances_get_one_prediction_each(server: KetchServer) -> None:
    answer = server.client.post("/v1/models/double:predict", json={"instances": [1, 2.5]})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"predictions": [3, 7.5]}  # version 2, the default
    one = server.client.post("/v1/models/double/versions/1:predict", json={"instances": [4]})
    assert one.json() == {"predictions": [8]}
    named = server.client.post(
        "/v1/models/describe:predict", json={"instances": [{"a": 1, "b": 2}, {"a": 3, "b": 4}]}
    )
    assert named.json() == {"predictions": [{"sum": 3, "label": "1+2"}, {"sum": 7, "label": "3+4"}]}


def test_columnar_inputs_get_columnar_outputs(server: KetchServer) -> None:
    answer = server.client.post("/v1/models/double/versions/1:predict", json={"inputs": [1, 2]})
    assert answer.json() == {"outputs": [2, 4]}
    named = server.client.post(
        "/v1/models/describe:predict", json={"inputs": {"a": [1, 3], "b": [2, 4]}}
    )
    assert named.json() == {"outputs": {"sum": [3, 7], "label": ["1+2", "3+4"]}}


def test_model_status_for_kserve_and_tensorflow_serving_clients(server: KetchServer) -> None:
    status = server.client.get("/v1/models/double").json()
    assert status["name"] == "double"
    assert status["ready"] is True
    assert status["model_version_status"] == [
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    ]
    assert (
        server.client.get("/v1/models/double/versions/1").json()["model_version_status"][0][
            "version"
        ]
        == "1"
    )


@pytest.mark.parametrize(
    "path, body, status, error",
    [
        ("/v1/models/nope:predict", {"instances": [1]}, 404, "Request for unknown model"),
        ("/v1/models/double:predict", {}, 400, "exactly one of 'instances' and 'inputs'"),
        ("/v1/models/double:predict", {"instances": [1], "inputs": [1]}, 400, "exactly one"),
        ("/v1/models/double:predict", {"instances": []}, 400, "instances"),
        ("/v1/models/describe:predict", {"inputs": {"a": [1], "b": [1, 2]}}, 400, "one length"),
        ("/v1/models/double:predict", {"inputs": 3}, 400, "'inputs' must be a list"),
    ],
)
def test_bad_requests_are_json_errors_and_the_gateway_keeps_serving(
    server: KetchServer, path: str, body: dict[str, object], status: int, error: str
) -> None:
    answer = server.client.post(path, json=body)
    assert answer.status_code == status, answer.text
    assert error in answer.json()["error"]
    assert (
        server.client.post("/v1/models/double:predict", json={"instances": [1]}).status_code == 200
    )
