"""Sequence models (Triton's sequence batcher) against a real `ketch serve` with two workers:
every request of a sequence reaches the worker that holds its state, in order, over REST,
gRPC and gRPC streams; the flags reach the model; idle and orphaned sequences end with errors
that say why."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio

import ketch
from tests.conftest import START_DEADLINE_S, KetchServer

MODELS = """
import os
import threading

import ketch
from ketch import TensorSpec

TOTALS = {}
HOLD = threading.Event()


@ketch.model(
    sequence=True,
    min_replicas=2,
    max_replicas=2,
    max_batch_size=8,
    inputs=[TensorSpec("x", "int64", ())],
    outputs=[TensorSpec("total", "int64", ()), TensorSpec("pid", "int64", ())],
)
def counter(xs: list[int], params: list[dict]) -> list[dict]:
    answers = []
    for x, p in zip(xs, params, strict=True):
        if x < 0:
            HOLD.wait(60)  # a step that computes until its worker is killed
        key = p["sequence_id"]
        TOTALS[key] = x if p["sequence_start"] else TOTALS[key] + x
        if p["sequence_end"]:
            TOTALS.pop(key)
        answers.append({"total": TOTALS.get(key, -1), "pid": os.getpid()})
    return answers


@ketch.model(
    sequence=True,
    sequence_idle_timeout_s=0.3,
    inputs=[TensorSpec("x", "int64", ())],
)
def flags(xs: list[int], params: list[dict]) -> list[str]:
    return [
        f"{p['sequence_id']!r} {p['sequence_start']} {p['sequence_end']} {p.get('user')}"
        for p in params
    ]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KetchServer]:
    path = tmp_path_factory.mktemp("sequences") / "models.py"
    path.write_text(textwrap.dedent(MODELS))
    served = KetchServer(path)
    try:
        served.wait_ready()
        deadline = time.monotonic() + START_DEADLINE_S
        while served.model_status("counter")["replicas"]["ready"] < 2:
            assert time.monotonic() < deadline, "counter's two workers never became ready"
            served.wait_for(r"model counter:1 ready: worker pid")
        yield served
    finally:
        served.stop()


def _step(
    server: KetchServer,
    model: str,
    x: int,
    **parameters: Any,
) -> httpx.Response:
    body = {
        "inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [x]}],
        "parameters": parameters,
    }
    return server.client.post(f"/v2/models/{model}/infer", json=body)


def _outputs(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return {o["name"]: o["data"][0] for o in response.json()["outputs"]}


def _grpc_input(x: int) -> triton.InferInput:
    tensor = triton.InferInput("x", [1], "INT64")
    tensor.set_data_from_numpy(np.array([x], dtype=np.int64))
    return tensor


def test_each_sequence_stays_on_its_worker_in_order(server: KetchServer) -> None:
    """Sixteen sequences of ten steps at once over gRPC: each step sees its own running
    total, so each went to the worker holding it; the sequences spread over both workers."""

    async def run_sequence(client: triton_aio.InferenceServerClient, index: int) -> set[int]:
        sequence_id: int | str = 7000 + index if index % 2 else f"user-{index}"
        pids = set()
        total = 0
        for step in range(10):
            total += step + index
            result = await client.infer(
                "counter",
                [_grpc_input(step + index)],
                sequence_id=sequence_id,
                sequence_start=step == 0,
                sequence_end=step == 9,
            )
            expected = -1 if step == 9 else total
            assert result.as_numpy("total").tolist() == [expected], (sequence_id, step)
            pids.add(int(result.as_numpy("pid")[0]))
        return pids

    async def main() -> list[set[int]]:
        client = triton_aio.InferenceServerClient(url=server.grpc)
        try:
            return await asyncio.gather(*(run_sequence(client, i) for i in range(16)))
        finally:
            await client.close()

    workers = asyncio.run(main())
    assert all(len(pids) == 1 for pids in workers), workers
    assert len(set().union(*workers)) == 2, "new sequences go to the worker holding fewest"
    status = server.model_status("counter")
    assert status["sequences"]["active"] == 0, "every sequence ended with its last step"


def test_a_stream_sent_without_waiting_arrives_in_order(server: KetchServer) -> None:
    answers: queue.Queue[Any] = queue.Queue()
    client = triton.InferenceServerClient(url=server.grpc)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for step in range(20):
            for sequence_id in (11, 12):
                client.async_stream_infer(
                    "counter",
                    [_grpc_input(step * sequence_id)],
                    request_id=f"{sequence_id}-{step}",
                    sequence_id=sequence_id,
                    sequence_start=step == 0,
                )
        totals: dict[str, int] = {}
        for _ in range(40):
            result, error = answers.get(timeout=START_DEADLINE_S)
            assert error is None, error
            totals[result.get_response().id] = int(result.as_numpy("total")[0])
        client.stop_stream()
    finally:
        client.close()
    for sequence_id in (11, 12):
        running = [sum(s * sequence_id for s in range(step + 1)) for step in range(20)]
        assert [totals[f"{sequence_id}-{step}"] for step in range(20)] == running


def test_the_model_sees_the_flags_and_parameters(server: KetchServer) -> None:
    said = _outputs(_step(server, "flags", 1, sequence_id="a", sequence_start=True, user=3))
    assert said["output_0"] == "'a' True False 3"
    said = _outputs(_step(server, "flags", 1, sequence_id="a", sequence_end=True))
    assert said["output_0"] == "'a' False True None"


def test_requests_outside_a_sequence_are_told_why(server: KetchServer) -> None:
    def refused(response: httpx.Response) -> str:
        assert response.status_code == 400, response.text
        error: str = response.json()["error"]
        return error

    assert "needs a 'sequence_id' parameter" in refused(_step(server, "counter", 1))
    assert "needs a 'sequence_id'" in refused(_step(server, "counter", 1, sequence_id=0))
    never = refused(_step(server, "counter", 1, sequence_id=404))
    assert "sequence 404 of model 'counter:1' is not active" in never
    assert "must set sequence_start" in never
    flag = refused(_step(server, "counter", 1, sequence_id=5, sequence_start="yes"))
    assert "'sequence_start' must be true or false" in flag
    # Ended by its last request: the next one says so.
    _outputs(_step(server, "counter", 2, sequence_id=77, sequence_start=True, sequence_end=True))
    over = refused(_step(server, "counter", 1, sequence_id=77))
    assert "it is over: its last request (sequence_end) came" in over
    # The plain predict route cannot name a sequence.
    plain = server.predict("counter", {"inputs": [1]})
    assert plain.status_code == 400
    assert "is a sequence model" in plain.json()["error"]
    # And everything still serves.
    assert _outputs(_step(server, "counter", 4, sequence_id=78, sequence_start=True))["total"] == 4


def test_an_idle_sequence_ends(server: KetchServer) -> None:
    _outputs(_step(server, "flags", 1, sequence_id=900, sequence_start=True))
    deadline = time.monotonic() + START_DEADLINE_S
    while server.model_status("flags")["sequences"]["active"]:
        assert time.monotonic() < deadline, "the idle sequence never ended"
        time.sleep(0.05)
    response = _step(server, "flags", 1, sequence_id=900)
    assert response.status_code == 400
    assert "it had no request for 0.3 s" in response.json()["error"]


def test_a_worker_lost_mid_sequence_ends_its_sequences(server: KetchServer) -> None:
    held = _outputs(_step(server, "counter", 5, sequence_id="lost", sequence_start=True))
    pid = held["pid"]
    status = server.model_status("counter")
    assert any(w["pid"] == pid and w["sequences"] >= 1 for w in status["workers"])
    # A step computing on the worker when it dies gets a 503 that says why.
    with httpx.Client(base_url=server.url, timeout=30) as other:
        body = {
            "inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [-1]}],
            "parameters": {"sequence_id": "lost"},
        }

        async def step_then_kill() -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                answer = asyncio.ensure_future(client.post("/v2/models/counter/infer", json=body))
                deadline = time.monotonic() + START_DEADLINE_S
                while not _computing(other, pid):
                    assert time.monotonic() < deadline, "the held step never reached its worker"
                    await asyncio.sleep(0.02)
                os.kill(pid, signal.SIGKILL)
                return await answer

        in_flight = asyncio.run(step_then_kill())
    assert in_flight.status_code == 503, in_flight.text
    error = in_flight.json()["error"]
    assert "sequence 'lost' of model 'counter:1' is over: its worker was lost" in error
    assert "start it again with sequence_start" in error
    server.wait_for(rf"lost worker pid {pid} ")
    later = _step(server, "counter", 1, sequence_id="lost")
    assert later.status_code == 400
    assert "its worker was lost" in later.json()["error"]
    # Started again, it runs on a live worker.
    again = _outputs(_step(server, "counter", 3, sequence_id="lost", sequence_start=True))
    assert again["total"] == 3 and again["pid"] != pid


def _computing(client: httpx.Client, pid: int) -> bool:
    models = client.get("/models").json()["models"]
    counter = next(m for m in models if m["name"] == "counter")
    return any(w["pid"] == pid and w["batches_in_flight"] for w in counter["workers"])


def test_the_config_shows_sequence_batching(server: KetchServer) -> None:
    config = server.client.get("/v2/models/flags/config").json()
    assert config["sequence_batching"] == {"max_sequence_idle_microseconds": 300000}
    assert "dynamic_batching" not in config
    client = triton.InferenceServerClient(url=server.grpc)
    try:
        answer = client.get_model_config("flags", as_json=True)
    finally:
        client.close()
    assert answer["config"]["sequence_batching"]["max_sequence_idle_microseconds"] == "300000"


def test_a_sequence_model_must_take_params() -> None:
    with pytest.raises(ValueError, match="must take a second argument, params"):

        @ketch.model(sequence=True)
        def forgetful(xs: list[int]) -> list[int]:
            return xs

    with pytest.raises(ValueError, match="sequence_idle_timeout_s of 'brief'"):

        @ketch.model(sequence=True, sequence_idle_timeout_s=0)
        def brief(xs: list[int], params: list[dict[str, Any]]) -> list[int]:
            return xs
