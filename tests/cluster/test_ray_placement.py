"""`ketch serve --placement ray`: Ray places each worker on a node with its model's
resources; the worker dials the gateway's broker, serves, scales to zero and back, and a
node that dies takes its workers with it while the pool places replacements elsewhere."""

from __future__ import annotations

import collections
import concurrent.futures
import re
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.cluster.conftest import RayCluster
from tests.conftest import KetchServer
from tests.wheels import build_wheel

pytestmark = pytest.mark.timeout(240)

MODELS = """
import os

import ketch


@ketch.model(placement={"resources": {"red": 1}}, idle_timeout_s=1)
def on_red(xs):
    return [os.getpid() for _ in xs]


@ketch.model(placement={"resources": {"blue": 1}})
def imported_from(xs):
    return [__file__ for _ in xs]
"""


def workers_of(server: KetchServer, name: str) -> list[dict[str, object]]:
    workers: list[dict[str, object]] = server.model_status(name)["workers"]
    return workers


def test_a_worker_runs_on_the_node_with_its_resources_and_scales_to_zero(
    ray_cluster: RayCluster,
    write_models: Callable[[str], Path],
    start_server: Callable[..., KetchServer],
) -> None:
    server = start_server(
        write_models(MODELS), "--placement", "ray", "--ray-address", ray_cluster.address
    )
    answer = server.predict("on_red", {"inputs": [1, 2]})
    assert answer.status_code == 200, answer.text
    (worker,) = workers_of(server, "on_red")
    assert worker["node"] == ray_cluster.node_with["red"]
    assert answer.json()["outputs"] == [worker["pid"]] * 2
    server.wait_for(r"model on_red:1 scaled to zero")
    assert workers_of(server, "on_red") == []
    again = server.predict("on_red", {"inputs": [3]})
    assert again.status_code == 200, again.text
    assert workers_of(server, "on_red")[0]["node"] == ray_cluster.node_with["red"]
    # SIGTERM (what Kubernetes sends) is a graceful stop, Ray connected or not.
    server.process.send_signal(signal.SIGTERM)
    server.wait_for(r"^ketch: stopped$")
    assert server.process.wait(30) == 0


def test_the_served_files_folder_travels_to_the_node_through_ray(
    ray_cluster: RayCluster,
    write_models: Callable[[str], Path],
    start_server: Callable[..., KetchServer],
) -> None:
    served = write_models(MODELS)
    (served.parent / "helper.txt").write_text("beside the served file")
    server = start_server(served, "--placement", "ray", "--ray-address", ray_cluster.address)
    answer = server.predict("imported_from", {"inputs": [1]})
    assert answer.status_code == 200, answer.text
    (imported,) = answer.json()["outputs"]
    # The worker imported the copy Ray unpacked on its node, not the gateway's file.
    copy = Path(imported)
    assert copy != served and copy.name == served.name
    assert "runtime_resources" in copy.parts
    assert copy.read_text() == served.read_text()
    assert (copy.parent / "helper.txt").read_text() == "beside the served file"


SPREAD_MODELS = """
import os
import time

import ketch


@ketch.model(
    placement={"resources": {"slot": 1}}, min_replicas=2, max_replicas=2, max_batch_size=4
)
def spread(xs):
    time.sleep(0.02)
    return [os.getpid() for _ in xs]
"""


def wait_for_ready_workers(server: KetchServer, model: str, count: int) -> None:
    """Wait until ``count`` workers of ``model`` have announced themselves ready so far."""
    line = rf"model {model}:1 ready: "
    seen = sum(1 for printed in server.seen if re.search(line, printed))
    for _ in range(count - seen):
        server.wait_for(line, timeout=60)


class Load:
    """Clients sending predictions without pause from threads, counting what comes back."""

    def __init__(self, server: KetchServer, model: str, clients: int = 4) -> None:
        self._url = f"{server.url}/models/{model}/predict"
        self._stop = threading.Event()
        self.sent = 0
        self.statuses: collections.Counter[int] = collections.Counter()
        self.failures: list[str] = []
        self._counted = threading.Condition()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                with self._counted:
                    self.sent += 1
                try:
                    answer = client.post(self._url, json={"inputs": [1]})
                except httpx.HTTPError as exc:
                    failure = repr(exc)
                    status = 0
                else:
                    failure = "" if answer.status_code == 200 else answer.text
                    status = answer.status_code
                with self._counted:
                    self.statuses[status] += 1
                    if failure:
                        self.failures.append(failure)
                    self._counted.notify_all()

    def answered(self) -> int:
        with self._counted:
            return self.statuses[200]

    def wait_answered(self, count: int, timeout: float = 60) -> None:
        """Until ``count`` answers (200) have come back in all."""
        with self._counted:
            if not self._counted.wait_for(lambda: self.statuses[200] >= count, timeout):
                pytest.fail(f"{self.statuses[200]} of {count} answers in {timeout} s")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


def test_a_node_that_dies_under_load_loses_no_request_and_its_worker_is_replaced(
    ray_cluster: RayCluster,
    write_models: Callable[[str], Path],
    start_server: Callable[..., KetchServer],
) -> None:
    nodes = [ray_cluster.add_node(slot=1) for _ in range(3)]
    try:
        server = start_server(
            write_models(SPREAD_MODELS),
            "--placement",
            "ray",
            "--ray-address",
            ray_cluster.address,
        )
        # Two replicas, spread: on two of the three nodes (each has room for one).
        wait_for_ready_workers(server, "spread", 2)
        placed = {str(w["node"]) for w in workers_of(server, "spread")}
        assert len(placed) == 2 and placed <= set(nodes), placed
        load = Load(server, "spread")
        try:
            load.wait_answered(50)
            doomed = sorted(placed)[0]
            ray_cluster.remove_node(doomed)
            server.wait_for(r"model spread:1 lost .*", timeout=60)
            server.wait_for(r"model spread:1 ready: ", timeout=60)
            load.wait_answered(load.answered() + 50)
        finally:
            load.stop()
        assert load.failures == [], load.failures[:3]
        assert load.answered() == load.sent
        now = {str(w["node"]) for w in workers_of(server, "spread")}
        # The replacement went to the node that had room, never to the dead one.
        assert now == (set(nodes) - {doomed}), (now, nodes, doomed)
    finally:
        for node in nodes:
            ray_cluster.remove_node(node)


def test_a_models_environment_is_built_on_the_node_ray_picks(
    ray_cluster: RayCluster,
    write_models: Callable[[str], Path],
    start_server: Callable[..., KetchServer],
    tmp_path: Path,
) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    build_wheel(
        wheelhouse,
        "ketchtest-greeting",
        "1.0",
        {"greeting.py": "def hello(name):\n    return f'hello {name}'\n"},
    )
    env = ["--no-index", f"--find-links {wheelhouse}", "ketchtest-greeting==1.0"]
    models = write_models(
        f"""
        import sys

        import ketch


        @ketch.model(env={env!r}, placement={{"resources": {{"blue": 1}}}})
        def greet(xs):
            from greeting import hello

            return [hello(x) + " from " + sys.executable for x in xs]
        """
    )
    gateway_store = tmp_path / "gateway-store"
    server = start_server(
        models,
        "--placement",
        "ray",
        "--ray-address",
        ray_cluster.address,
        "--store",
        str(gateway_store),
    )
    answer = server.predict("greet", {"input": "ada"})
    assert answer.status_code == 200, answer.text
    greeting, _, python = answer.json()["output"].partition(" from ")
    assert greeting == "hello ada"
    # The node's own build, in its store, not the gateway's (which built it to import the file).
    assert python.startswith(str(ray_cluster.node_store / "envs")), python
    assert (gateway_store / "envs").is_dir()
    (worker,) = workers_of(server, "greet")
    assert worker["node"] == ray_cluster.node_with["blue"]


LOADED_MODELS = """
import os
import time

import numpy as np

import ketch

KEEP = []


@ketch.model(
    placement={"resources": {"red": 1}},
    max_replicas=2,
    target_inflight=1,
    max_batch_size=1,
)
def busy(xs):
    time.sleep(0.5)
    return [os.getpid() for _ in xs]


@ketch.model(placement={"resources": {"blue": 1}}, memory_mb=150)
def leaky(xs):
    if xs[0] == "leak":
        KEEP.append(np.ones(300 * 1024 * 1024 // 8))  # 300 MB, really touched
        time.sleep(30)  # still computing when its launcher notices
    return [os.getpid() for _ in xs]
"""


def test_a_ray_pool_scales_out_under_load_and_recycles_a_worker_over_its_memory_cap(
    ray_cluster: RayCluster,
    write_models: Callable[[str], Path],
    start_server: Callable[..., KetchServer],
) -> None:
    server = start_server(
        write_models(LOADED_MODELS), "--placement", "ray", "--ray-address", ray_cluster.address
    )
    # Four requests at once for a pool that aims at one per worker: a second worker, on red.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: server.predict("busy", {"inputs": [i]}), range(4)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    wait_for_ready_workers(server, "busy", 2)
    workers = workers_of(server, "busy")
    assert len(workers) == 2
    assert {w["node"] for w in workers} == {ray_cluster.node_with["red"]}

    assert server.predict("leaky", {"input": "small"}).status_code == 200
    leak = server.predict("leaky", {"input": "leak"})
    assert leak.status_code == 503, leak.text
    # The worker that took the leak is named, whichever it was (on a busy machine a stalled
    # worker may have been replaced in between, and the pool had another).
    recycled = re.search(
        r"worker pid (\d+) was recycled: it used \d+ MB of resident memory, over its "
        r"memory_mb cap of 150 MB",
        leak.json()["error"],
    )
    assert recycled is not None, leak.text
    again = server.predict("leaky", {"input": "small"})
    assert again.status_code == 200, again.text
    assert again.json()["output"] != int(recycled.group(1))
