"""A real local Ray cluster for the cluster tests: a head and two nodes with different custom
resources, all on loopback."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Keeps every Ray process on loopback (left alone, Ray advertises the machine's address).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# The `ray` tox environment installs ketch[ray]: without it these tests fail, never skip.
from ray.cluster_utils import Cluster

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def node_environment(store: Path) -> Iterator[None]:
    """What the nodes started meanwhile inherit (their raylets pass it to their workers): a
    model store of their own, where they build models' environments (as another machine's
    would be), never the user's."""
    os.environ["KETCH_STORE"] = str(store)
    try:
        yield
    finally:
        del os.environ["KETCH_STORE"]


@dataclass
class RayCluster:
    cluster: Cluster
    address: str
    #: Ray's node id of the node with each custom resource.
    node_with: dict[str, str]
    #: The store the nodes build environments in.
    node_store: Path

    def add_node(self, **resources: float) -> str:
        """A node of a test's own (removed by the test), with ``resources``; its node id."""
        with node_environment(self.node_store):
            node = self.cluster.add_node(num_cpus=1, resources=resources, node_ip_address=LOOPBACK)
        self.cluster.wait_for_nodes()
        return str(node.node_id)

    def remove_node(self, node_id: str) -> None:
        """Kill a node's raylet and everything it runs, as a machine that dies would."""
        for node in self.cluster.worker_nodes:
            if node.node_id == node_id:
                self.cluster.remove_node(node, allow_graceful=False)
                return


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    node_store = tmp_path_factory.mktemp("ray-node-store")
    with node_environment(node_store):
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "node_ip_address": LOOPBACK,
                "include_dashboard": False,
            },
        )
    try:
        node_with = {}
        for resource in ("red", "blue"):
            with node_environment(node_store):
                node = cluster.add_node(
                    num_cpus=2, resources={resource: 2}, node_ip_address=LOOPBACK
                )
            node_with[resource] = node.node_id
        cluster.wait_for_nodes()
        yield RayCluster(cluster, cluster.address, node_with, node_store)
    finally:
        cluster.shutdown()
