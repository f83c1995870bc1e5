"""`ketch worker --connect`: workers started by hand join a running gateway's pools."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import KetchProcess, KetchServer

StartServer = Callable[..., KetchServer]
StartWorker = Callable[..., KetchProcess]
WriteModels = Callable[..., Path]

SERVED = """
    import os
    import ketch

    @ketch.model
    def whoami(xs):
        return [os.getpid()] * len(xs)
"""

ELSEWHERE = """
    import ketch

    @ketch.model(name="triple", version="3")
    def triple(xs):
        return [3 * x for x in xs]

    @ketch.model
    def other(xs):
        return xs
"""


@pytest.fixture(autouse=True)
def shared_keys(broker_keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every gateway and hand-started worker here uses the keys `ketch keygen` wrote, through
    the variable both commands read for --broker-keys."""
    monkeypatch.setenv("KETCH_BROKER_KEYS", str(broker_keys))


def test_hand_started_worker_joins_the_pool_of_a_served_model(
    start_server: StartServer, start_worker: StartWorker, write_models: WriteModels
) -> None:
    models = write_models(SERVED)
    server = start_server(models, "--workers-per-model", "1")
    worker = start_worker(f"{models}:whoami", server.broker)
    remote_pid = worker.process.pid
    server.wait_for(rf"model whoami:1 ready: worker pid {remote_pid} ")
    status = server.model_status("whoami")
    assert status["replicas"]["ready"] == 2
    pids = {w["pid"] for w in status["workers"]}
    assert remote_pid in pids and len(pids) == 2

    # Stopping the hand-started worker leaves the served one answering.
    worker.stop()
    server.wait_for(rf"lost worker pid {remote_pid}")
    answer = server.predict("whoami", {"input": 0}).json()["output"]
    assert answer != remote_pid and answer in {
        w["pid"] for w in server.model_status("whoami")["workers"]
    }


def test_worker_for_a_model_the_gateway_does_not_define_adds_it(
    start_server: StartServer, start_worker: StartWorker, write_models: WriteModels
) -> None:
    server = start_server(write_models(SERVED))
    assert server.predict("triple", {"input": 1}).status_code == 404

    start_worker(f"{write_models(ELSEWHERE, 'elsewhere.py')}:triple", server.broker)
    server.wait_for(r"model triple:3 ready")
    response = server.predict("triple", {"inputs": [1, 2]})
    assert response.status_code == 200
    assert (response.json()["outputs"], response.json()["version"]) == ([3, 6], "3")
    # Models that join by hand do not hold back the gateway's readiness.
    assert server.client.get("/v2/health/ready").json() == {"ready": True}


def test_worker_rejoins_a_gateway_that_restarted(
    start_server: StartServer, start_worker: StartWorker, write_models: WriteModels
) -> None:
    elsewhere = write_models(ELSEWHERE, "elsewhere.py")
    first = start_server(write_models(SERVED))
    broker = first.broker
    worker = start_worker(f"{elsewhere}:triple", broker)
    first.wait_for(r"model triple:3 ready")
    first.stop()

    # Same broker address, new gateway: the worker notices the silence and sends READY again.
    second = start_server(write_models(SERVED), "--broker", broker)
    second.wait_for(rf"model triple:3 ready: worker pid {worker.process.pid}", seen_too=True)
    assert second.predict("triple", {"input": 5}).json()["output"] == 15


def test_worker_that_cannot_load_its_model_says_why(
    start_worker: StartWorker, write_models: WriteModels
) -> None:
    worker = start_worker(f"{write_models(ELSEWHERE, 'elsewhere.py')}:missing", "tcp://127.0.0.1:9")
    assert worker.process.wait(60) == 2
    worker.stop()
    assert any("has no model named 'missing'" in line for line in worker.stderr_lines)
    assert any("triple" in line for line in worker.stderr_lines)


def test_model_whose_only_hand_started_worker_left_answers_503_at_once(
    start_server: StartServer, start_worker: StartWorker, write_models: WriteModels
) -> None:
    server = start_server(write_models(SERVED))
    worker = start_worker(f"{write_models(ELSEWHERE, 'elsewhere.py')}:triple", server.broker)
    server.wait_for(r"model triple:3 ready")
    worker.stop()
    server.wait_for(r"model triple:3 lost")
    response = server.predict("triple", {"input": 1})
    assert response.status_code == 503
    assert "no worker serves model 'triple:3'" in response.json()["error"]
    assert server.model_status("triple")["state"] == "unavailable"
