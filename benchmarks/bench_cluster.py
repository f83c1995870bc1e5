"""ketch on a Ray cluster: the cold start of a Ray-placed worker next to a local one, and a
node that dies under load.

The benchmark starts a real local Ray cluster (``ray.cluster_utils.Cluster``: a head with no
CPUs and ``--nodes`` nodes, each with one ``slot`` resource, every process on 127.0.0.1), then
two phases, each against its own ``ketch serve``:

1. **cold start**: the same model (``idle_timeout_s=0.5``) served locally and with
   ``--placement ray``; ``--cycles`` times each, one request is sent to the pool at zero and
   timed, then the benchmark waits for ``scaled to zero``. Prints p50 and max of both and the
   ratio of their p50s (Ray over local): what placing a worker through Ray costs.
2. **node loss**: a model with two replicas needing a ``slot`` each (``strategy="spread"``,
   so on two nodes); ``--clients`` closed-loop clients send requests, and after
   ``--warmup`` answers the node of one replica is killed (raylet and all, as a machine that
   dies). Prints requests answered / sent, how many were 200, and the seconds from the kill to
   the replacement's ``ready`` on another node.

Run from anywhere, with ``ketch[ray]`` installed::

    python benchmarks/bench_cluster.py [--cycles 10] [--clients 8]

Exit code 0 once the figures are printed (a benchmark, not a test), 1 when something could not
be measured.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from ketch_server import WORKER_LOST, KetchServer, write_models
from server_process import ServerError

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 120.0

COLD_MODELS = """
    import ketch


    @ketch.model(idle_timeout_s=0.5)
    def cold(xs):
        return [x + 1 for x in xs]
"""
SPREAD_MODELS = """
    import time

    import ketch


    @ketch.model(
        placement={"resources": {"slot": 1}, "strategy": "spread"},
        min_replicas=2,
        max_replicas=2,
        max_batch_size=8,
    )
    def spread(xs):
        time.sleep(0.005)
        return [x + 1 for x in xs]
"""


def _wait_line(server: KetchServer, needle: str, timeout_s: float) -> str:
    """The next stdout line holding ``needle`` (lost workers are expected here)."""
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        line = server.next_line(remaining)
        if line is not None and needle in line:
            return line
    raise ServerError(f"no line with {needle!r} within {timeout_s:g} s\n{server.diagnostics()}")


def cold_starts(models: Path, extra: tuple[str, ...], cycles: int) -> list[float]:
    """Seconds of one request to the pool at zero, ``cycles`` times."""
    seconds = []
    with KetchServer(models, extra) as server, httpx.Client(timeout=120) as client:
        url = f"{server.start(START_TIMEOUT_S)}/models/cold/predict"
        for _ in range(cycles):
            start = time.perf_counter()
            answer = client.post(url, json={"inputs": [1]})
            seconds.append(time.perf_counter() - start)
            if answer.status_code != 200:
                raise ServerError(f"cold start answered {answer.status_code}: {answer.text}")
            _wait_line(server, "scaled to zero", 60)
    return seconds


class Load:
    """Closed-loop clients on threads; every request sent lands in one count."""

    def __init__(self, url: str, clients: int) -> None:
        self.sent = 0
        self.statuses: collections.Counter[str] = collections.Counter()
        self._url = url
        self._stop = threading.Event()
        self._counted = threading.Condition()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                with self._counted:
                    self.sent += 1
                try:
                    outcome = str(client.post(self._url, json={"inputs": [1]}).status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                with self._counted:
                    self.statuses[outcome] += 1
                    self._counted.notify_all()

    def wait_answered(self, count: int, timeout_s: float) -> None:
        with self._counted:
            if not self._counted.wait_for(lambda: self.statuses["200"] >= count, timeout_s):
                raise ServerError(f"only {self.statuses['200']} of {count} answers")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def node_loss(cluster: Any, nodes: dict[str, Any], models: Path, args: argparse.Namespace) -> None:
    extra = ("--placement", "ray", "--ray-address", cluster.address)
    with KetchServer(models, extra) as server:
        # ketch: ready comes once the pool's two replicas are ready.
        base = server.start(START_TIMEOUT_S)
        placed = {str(w["node"]) for w in server.model_status("spread")["workers"]}
        load = Load(f"{base}/models/spread/predict", args.clients)
        try:
            load.wait_answered(args.warmup, 60)
            doomed = sorted(placed)[0]
            killed_at = time.monotonic()
            cluster.remove_node(nodes[doomed], allow_graceful=False)
            lost = _wait_line(server, "spread:1 lost", 60)
            lost_s = time.monotonic() - killed_at
            _wait_line(server, "spread:1 ready", 60)
            replaced_s = time.monotonic() - killed_at
            answered_then = load.statuses["200"]
            load.wait_answered(answered_then + args.warmup, 60)
        finally:
            load.stop()
        now = {str(w["node"]) for w in server.model_status("spread")["workers"]}
    answered = sum(n for outcome, n in load.statuses.items() if outcome.isdigit())
    print("node loss (2 replicas on 2 of 3 nodes, one node killed under load)")
    print(f"  requests answered / sent: {answered} / {load.sent} ({dict(load.statuses)})")
    reason = match["reason"] if (match := WORKER_LOST.match(lost)) else lost
    print(f"  worker seen lost after:   {lost_s:.2f} s ({reason})")
    print(f"  replacement ready after:  {replaced_s:.2f} s, on another node: {doomed not in now}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=200, help="answers before the node dies")
    args = parser.parse_args(argv)
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "node_ip_address": LOOPBACK, "include_dashboard": False},
    )
    try:
        nodes = {}
        for _ in range(3):
            node = cluster.add_node(num_cpus=1, resources={"slot": 1}, node_ip_address=LOOPBACK)
            nodes[str(node.node_id)] = node
        cluster.wait_for_nodes()
        with tempfile.TemporaryDirectory(prefix="ketch-bench-cluster-") as folder:
            cold_dir = Path(folder) / "cold"
            cold_dir.mkdir()
            cold = write_models(cold_dir, COLD_MODELS)
            local = cold_starts(cold, (), args.cycles)
            placed = cold_starts(
                cold, ("--placement", "ray", "--ray-address", cluster.address), args.cycles
            )
            print(f"cold start from zero, {args.cycles} cycles each")
            for name, seconds in (("local", local), ("ray", placed)):
                print(
                    f"  {name:5}  p50 {statistics.median(seconds) * 1e3:7.1f} ms"
                    f"  max {max(seconds) * 1e3:7.1f} ms"
                )
            print(
                f"  ray / local (p50): {statistics.median(placed) / statistics.median(local):.1f}x"
            )
            spread_dir = Path(folder) / "spread"
            spread_dir.mkdir()
            node_loss(cluster, nodes, write_models(spread_dir, SPREAD_MODELS), args)
    except ServerError as exc:
        print(f"bench_cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
