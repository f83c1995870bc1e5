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

    @ketch.model(max_replicas=2)
    def whoami(xs):
        return [os.getpid()] * len(xs)
"""

BOUNDED = """
    import os
    import ketch

    @ketch.model(max_replicas=1)
    def bounded(xs):
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


def test_a_hand_started_worker_counts_against_the_pools_bound_and_takes_the_load(
    start_server: StartServer, start_worker: StartWorker, write_models: WriteModels
) -> None:
    models = write_models(BOUNDED)
    server = start_server(models)
    cold = server.predict("bounded", {"inputs": [0]})  # starts the pool's own worker
    assert cold.status_code == 200, cold.text
    (local_pid,) = cold.json()["outputs"]
    worker = start_worker(f"{models}:bounded", server.broker)
    remote_pid = worker.process.pid
    server.wait_for(rf"model bounded:1 ready: worker pid {remote_pid} ")
    # max_replicas=1 counts both: the pool lets its own worker go, now, not after an idle time.
    server.wait_for(
        rf"model bounded:1 lost worker pid {local_pid} .*over max_replicas=1", seen_too=True
    )
    answers = [server.predict("bounded", {"inputs": [i]}) for i in range(20)]
    assert {a.json()["outputs"][0] for a in answers} == {remote_pid}
    status = server.model_status("bounded")
    assert status["replicas"]["ready"] == 1
    assert [w["pid"] for w in status["workers"]] == [remote_pid]


def test_worker_for_a_model_the_gateway_does_not_serve_is_refused_and_says_so(
    start_server: StartServer, start_worker: StartWorker, write_models: WriteModels
) -> None:
    server = start_server(write_models(SERVED))
    worker = start_worker(f"{write_models(ELSEWHERE, 'elsewhere.py')}:triple", server.broker)
    server.wait_for(
        rf"refused a worker connection from worker pid {worker.process.pid} on \S+ \(triple:3\): "
        r"this gateway does not serve model 'triple:3' \(it serves: whoami:1\); "
        r"`ketch serve --allow-worker-models` lets workers add models"
    )
    worker.wait_for_stderr(r"the gateway at \S+ refused this worker: this gateway does not serve")
    assert worker.process.poll() is None  # it tries again later, on a back-off
    assert server.predict("triple", {"input": 1}).status_code == 404
    metrics = server.client.get("/metrics").text
    assert 'ketch_broker_refused_total{stage="admission"} 1.0' in metrics


def test_with_allow_worker_models_a_hand_started_worker_adds_its_model(
    start_server: StartServer, start_worker: StartWorker, write_models: WriteModels
) -> None:
    server = start_server(write_models(SERVED), "--allow-worker-models")
    assert server.predict("triple", {"input": 1}).status_code == 404

    start_worker(f"{write_models(ELSEWHERE, 'elsewhere.py')}:triple", server.broker)
    server.wait_for(r"model triple:3 ready")
    response = server.predict("triple", {"inputs": [1, 2]})
    assert response.status_code == 200
    assert (response.json()["outputs"], response.json()["version"]) == ([3, 6], "3")
    # Models that join by hand do not hold back the gateway's readiness.
    assert server.client.get("/v2/health/ready").json() == {"ready": True}


def test_worker_rejoins_a_gateway_that_restarted_and_never_blocks_its_start(
    start_server: StartServer, start_worker: StartWorker, write_models: WriteModels
) -> None:
    models = write_models(SERVED)
    first = start_server(models, "--allow-worker-models")
    broker = first.broker
    worker = start_worker(f"{models}:whoami", broker)
    first.wait_for(rf"model whoami:1 ready: worker pid {worker.process.pid} ")
    first.stop()

    # Same broker address, new gateway: the worker notices the silence and sends READY again.
    # It may reach the new broker before the served file is imported; the broker reads no
    # READY until then, so the file's own whoami:1 is never taken for a worker's model.
    second = start_server(models, "--broker", broker, "--allow-worker-models")
    second.wait_for(rf"model whoami:1 ready: worker pid {worker.process.pid} ", seen_too=True)
    assert worker.process.pid in {w["pid"] for w in second.model_status("whoami")["workers"]}


def test_worker_that_cannot_load_its_model_says_why(
    start_worker: StartWorker, write_models: WriteModels
) -> None:
    worker = start_worker(f"{write_models(ELSEWHERE, 'elsewhere.py')}:missing", "tcp://127.0.0.1:9")
    assert worker.process.wait(60) == 2
    worker.stop()
    assert any("has no model named 'missing'" in line for line in worker.stderr_lines)
    assert any("triple" in line for line in worker.stderr_lines)


def test_a_model_only_a_departed_worker_defined_goes_with_it(
    start_server: StartServer, start_worker: StartWorker, write_models: WriteModels
) -> None:
    server = start_server(write_models(SERVED), "--allow-worker-models")
    worker = start_worker(f"{write_models(ELSEWHERE, 'elsewhere.py')}:triple", server.broker)
    server.wait_for(r"model triple:3 ready")
    worker.stop()
    server.wait_for(r"model triple:3 removed")
    response = server.predict("triple", {"input": 1})
    assert response.status_code == 404
    assert "triple" not in {m["name"] for m in server.client.get("/models").json()["models"]}
