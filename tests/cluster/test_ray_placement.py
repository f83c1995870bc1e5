"""`ketch serve --placement ray`: Ray places each worker on a node with its model's
resources; the worker dials the gateway's broker, serves, scales to zero and back, and a
node that dies takes its workers with it while the pool places replacements elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster.conftest import RayCluster
from tests.conftest import KetchServer

pytestmark = pytest.mark.timeout(240)

MODELS = """
import os

import ketch


@ketch.model(placement={"resources": {"red": 1}}, idle_timeout_s=1)
def on_red(xs):
    return [os.getpid() for _ in xs]
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
