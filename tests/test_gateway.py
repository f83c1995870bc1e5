"""End to end over HTTP: `ketch serve tests/servable.py` with real worker processes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import KetchServer

SERVABLE = Path(__file__).with_name("servable.py")


@pytest.fixture(scope="module")
def server() -> Iterator[KetchServer]:
    served = KetchServer(SERVABLE, "--workers-per-model", "1")
    try:
        yield served.wait_ready()
    finally:
        served.stop()


def test_single_input_returns_one_output_with_model_and_query_id(server: KetchServer) -> None:
    response = server.predict("double", {"input": 21})
    assert response.status_code == 200
    body = response.json()
    assert body["output"] == 42
    assert body["model"] == "double"
    assert body["version"] == "1"
    assert len(body["query_id"]) == 32
    assert server.predict("double", {"input": 21}).json()["query_id"] != body["query_id"]


def test_batch_inputs_return_outputs_in_order(server: KetchServer) -> None:
    response = server.predict("double", {"inputs": [1, 2, 3.5]})
    assert response.status_code == 200
    assert response.json()["outputs"] == [2, 4, 7.0]


def test_request_larger_than_max_batch_size_is_split_and_reassembled(server: KetchServer) -> None:
    response = server.predict("batch_sizes", {"inputs": list(range(10))})
    assert response.status_code == 200
    # max_batch_size=4: the model never sees more than 4 inputs at once.
    assert response.json()["outputs"] == [4, 4, 4, 4, 4, 4, 4, 4, 2, 2]


def test_concurrent_requests_are_batched_together(server: KetchServer) -> None:
    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            responses = await asyncio.gather(
                *(client.post("/models/batch_sizes/predict", json={"input": i}) for i in range(40))
            )
        assert all(r.status_code == 200 for r in responses)
        return [r.json()["output"] for r in responses]

    sizes = asyncio.run(burst())
    assert max(sizes) > 1, "40 concurrent requests never shared a batch"
    assert max(sizes) <= 4


def test_versions_default_to_the_highest_and_can_be_chosen(server: KetchServer) -> None:
    assert server.predict("scale", {"input": 1}).json()["output"] == 100
    assert server.predict("scale", {"input": 1, "version": "1"}).json()["output"] == 10
    chosen = server.predict("scale", {"input": 1, "version": 2}).json()
    assert (chosen["output"], chosen["version"]) == (100, "2")


def test_numpy_model_gets_a_stacked_array_and_outputs_become_json(server: KetchServer) -> None:
    response = server.predict("row_sums", {"inputs": [[1, 2], [3, 4.5]]})
    assert response.status_code == 200
    assert response.json()["outputs"] == [3, 7.5]
    normalized = server.predict("normalize", {"input": [3, 4]}).json()["output"]
    assert normalized == pytest.approx([0.6, 0.8])


def test_async_model(server: KetchServer) -> None:
    assert server.predict("async_double", {"inputs": [1, 2]}).json()["outputs"] == [2, 4]


def test_list_models_shows_versions_replicas_and_state(server: KetchServer) -> None:
    models = server.client.get("/models").json()["models"]
    names = {(m["name"], m["version"]) for m in models}
    assert {("double", "1"), ("scale", "1"), ("scale", "2"), ("row_sums", "1")} <= names
    double = server.model_status("double")
    assert double["state"] == "ready"
    assert double["replicas"] == {"ready": 1, "starting": 0}
    assert double["workers"][0]["pid"] > 0
    assert double["batch_input"] == "list"
    assert server.model_status("row_sums")["batch_input"] == "numpy"
    assert server.model_status("scale", "2")["default"] is True
    assert server.model_status("scale", "1")["default"] is False
    assert server.model_status("batch_sizes")["max_batch_size"] == 4


def test_health_routes(server: KetchServer) -> None:
    assert server.client.get("/v2/health/live").json() == {"live": True}
    ready = server.client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})


@pytest.mark.parametrize(
    ("content", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object, got a JSON array"),
        (b'{"x": 1}', 400, "needs 'input'"),
        (b'{"input": 1, "inputs": [1]}', 400, "not both"),
        (b'{"inputs": 3}', 400, "'inputs' must be a non-empty list, got 3"),
        (b'{"inputs": []}', 400, "empty"),
        (b'{"input": 1, "version": [1]}', 400, "'version' must be a string"),
    ],
)
def test_bad_requests_get_400_naming_the_problem(
    server: KetchServer, content: bytes, status: int, fragment: str
) -> None:
    response = server.client.post("/models/double/predict", content=content)
    assert response.status_code == status
    assert fragment in response.json()["error"]
    assert server.predict("double", {"input": 1}).json()["output"] == 2


def test_unknown_model_and_version_get_404(server: KetchServer) -> None:
    response = server.predict("nope", {"input": 1})
    assert response.status_code == 404
    assert response.json()["error"] == "Request for unknown model: 'nope' is not found"
    assert "double" in response.json()["models"]
    response = server.predict("scale", {"input": 1, "version": "7"})
    assert response.status_code == 404
    assert response.json()["versions"] == ["1", "2"]


def test_unknown_route_and_wrong_method_are_json_errors(server: KetchServer) -> None:
    response = server.client.get("/nowhere")
    assert (response.status_code, response.json()) == (404, {"error": "Not Found"})
    assert server.client.get("/models/double/predict").status_code == 405


def test_answers_without_reading_the_body_keep_the_connection_usable(
    server: KetchServer,
) -> None:
    # Each of these is answered from its path or headers alone. The body must still be read,
    # or the server closes the keep-alive connection under the client's next request.
    refused = [
        ("POST", "/nowhere", 404),
        ("POST", "/models", 405),
        ("POST", "/apps/none/predict", 404),
        ("DELETE", "/admin/models/double", 401),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for round_ in range(300):
            for method, path, status in refused:
                body = {"input": "x" * (round_ % 64)}
                assert client.request(method, path, json=body).status_code == status
            assert client.post("/models/double/predict", json={"input": 2}).json()["output"] == 4


def test_model_that_raises_gets_500_and_its_worker_keeps_serving(server: KetchServer) -> None:
    pid_before = server.model_status("fails")["workers"][0]["pid"]
    response = server.predict("fails", {"input": 3})
    assert response.status_code == 500
    body = response.json()
    assert body["type"] == "ValueError"
    assert body["message"] == "cannot handle 3"
    assert body["model"] == "fails"
    assert "ValueError: cannot handle 3" in body["error"]
    assert server.predict("fails", {"input": 4}).json()["message"] == "cannot handle 4"
    assert server.model_status("fails")["workers"][0]["pid"] == pid_before


def test_wrong_number_of_outputs_gets_500_saying_so(server: KetchServer) -> None:
    response = server.predict("wrong_count", {"inputs": [1, 2]})
    assert response.status_code == 500
    assert "returned 3 outputs for a batch of 2 inputs" in response.json()["error"]


def test_unsendable_output_gets_500_naming_the_type(server: KetchServer) -> None:
    response = server.predict("unsendable", {"input": 1})
    assert response.status_code == 500
    assert "object" in response.json()["error"]


def test_ragged_input_to_numpy_model_gets_400(server: KetchServer) -> None:
    response = server.predict("row_sums", {"inputs": [[1, 2], [3]]})
    assert response.status_code == 400
    assert "cannot be stacked" in response.json()["error"]
    assert server.predict("row_sums", {"input": [1, 1]}).json()["output"] == 2


def test_one_failing_request_does_not_affect_others_in_flight(server: KetchServer) -> None:
    async def mixed() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"/models/{'fails' if i % 3 == 0 else 'double'}/predict", json={"input": i}
                    )
                    for i in range(30)
                )
            )

    for i, response in enumerate(asyncio.run(mixed())):
        if i % 3 == 0:
            assert response.status_code == 500
        else:
            assert response.json()["output"] == 2 * i
