"""`ketch serve --gateways N`: N gateway processes on one port (SO_REUSEPORT) that share the
workers, their state in a private Redis that ketch starts itself, all gone when it stops."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

from tests.conftest import KetchServer

Start = Callable[..., KetchServer]

MODELS = """
import os

import ketch


@ketch.model(max_replicas=1)
def whoami(xs):
    return [os.getpid() for _ in xs]


echo = ketch.app("echo", models=["whoami"], policy="single")
"""


def listeners(port: int) -> set[int]:
    """The processes listening on ``port``."""
    return {
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
    }


def group_of(server: KetchServer) -> set[int]:
    parent = psutil.Process(server.process.pid)
    return {parent.pid, *(child.pid for child in parent.children(recursive=True))}


def test_two_gateway_processes_share_the_port_the_workers_and_the_state(
    start_server: Start, write_models: Callable[[str], Path]
) -> None:
    server = start_server(write_models(MODELS), "--gateways", "2")
    port = urlsplit(server.url).port
    assert port is not None
    gateways = listeners(port)
    assert len(gateways) == 2 and gateways <= group_of(server)
    # Each request on a connection of its own, so the kernel spreads them over the two.
    pids = set()
    query_ids = []
    for _ in range(40):
        with httpx.Client(base_url=server.url, timeout=30) as client:
            answer = client.post("/models/whoami/predict", json={"inputs": [1]})
            assert answer.status_code == 200, answer.text
            pids.add(answer.json()["outputs"][0])
            asked = client.post("/apps/echo/predict", json={"input": 1})
            assert asked.status_code == 200, asked.text
            query_ids.append(asked.json()["query_id"])
    # One worker for both (max_replicas=1 is the one pool's bound).
    assert len(pids) == 1
    # Feedback for each query at whichever gateway the connection lands on.
    for query_id in query_ids:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            told = client.post("/apps/echo/feedback", json={"query_id": query_id, "reward": 1})
            assert told.status_code == 200, told.text
    everything = [psutil.Process(pid) for pid in group_of(server)]
    assert server.stop() == 0
    # The other gateway, the private Redis, the workers and their helpers all end with it
    # (helpers such as a forkserver end when their parent's pipe closes: waited for).
    _, alive = psutil.wait_procs(everything, timeout=20)
    assert [p for p in alive if _running(p)] == []


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


ADDED = """
import ketch


@ketch.model(name="added")
def added(xs):
    return [x * 10 for x in xs]
"""


def test_a_management_change_reaches_every_gateway_process_and_ends_with_the_run(
    start_server: Start, write_models: Callable[[str], Path]
) -> None:
    models = write_models(MODELS)
    added = write_models(ADDED, "added.py")
    token = {"Authorization": "Bearer test-admin-token"}
    server = start_server(models, "--gateways", "2", "--admin-token", "test-admin-token")
    body = {"name": "added", "runtime": "python", "path": f"{added}:added"}
    made = server.client.post("/admin/models", json=body, headers=token)
    assert made.status_code == 201, made.text
    # Connections spread over both processes: each serves the model the other added.
    for _ in range(40):
        with httpx.Client(base_url=server.url, timeout=30) as client:
            answer = client.post("/models/added/predict", json={"inputs": [2]})
            assert answer.status_code == 200, answer.text
            assert answer.json()["outputs"] == [20]
    assert server.stop() == 0
    # A new run serves its file, as a lone gateway's restart does.
    again = start_server(models, "--gateways", "2")
    assert again.predict("added", {"inputs": [2]}).status_code == 404
