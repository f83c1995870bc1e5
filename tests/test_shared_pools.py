"""Gateways that share one Redis (`--state redis://...`) share their workers too: each worker
joins every gateway, one gateway at a time runs the pools' scaling (a lease in Redis), a
request at a gateway whose pool is at zero cold-starts a worker at the lease holder, and when
the holder goes, another takes the lease and starts what the load asks for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.conftest import KetchServer
from tests.redis_server import RedisServer

Start = Callable[..., KetchServer]

MODELS = """
import os

import ketch


@ketch.model(max_replicas=1)
def whoami(xs):
    return [os.getpid() for _ in xs]
"""


@pytest.fixture(autouse=True)
def _shared_keys(monkeypatch: pytest.MonkeyPatch, broker_keys: Path) -> None:
    """Every gateway here uses the keys `ketch keygen` wrote (--broker-keys, by its variable)."""
    monkeypatch.setenv("KETCH_BROKER_KEYS", str(broker_keys))


def pid_from(server: KetchServer) -> int:
    answer = server.predict("whoami", {"inputs": [1]})
    assert answer.status_code == 200, answer.text
    (pid,) = answer.json()["outputs"]
    return int(pid)


def worker_pids(server: KetchServer) -> list[int]:
    return [int(w["pid"]) for w in server.model_status("whoami")["workers"]]


@pytest.fixture
def gateways(
    start_server: Start, write_models: Callable[[str], Path], redis_server: RedisServer
) -> tuple[KetchServer, KetchServer]:
    """Two gateways on one Redis, the first started first (so it takes the pools lease)."""
    models = write_models(MODELS)
    first = start_server(models, "--state", redis_server.url)
    return first, start_server(models, "--state", redis_server.url)


def test_a_request_at_either_gateway_is_served_by_the_one_pool_they_share(
    gateways: tuple[KetchServer, KetchServer],
) -> None:
    first, second = gateways
    # The second gateway's pool is at zero: its request cold-starts the one worker at the
    # first (which holds the lease), and that worker joins the second too.
    pid = pid_from(second)
    first.wait_for(rf"model whoami:1 ready: worker pid {pid} ", seen_too=True)
    second.wait_for(rf"model whoami:1 ready: worker pid {pid} ", seen_too=True)
    assert {pid_from(first) for _ in range(5)} == {pid}
    assert {pid_from(second) for _ in range(5)} == {pid}
    # One pool: max_replicas=1 holds across the two gateways.
    assert worker_pids(first) == worker_pids(second) == [pid]


def test_when_the_lease_holder_goes_another_gateway_takes_over_the_pool(
    gateways: tuple[KetchServer, KetchServer],
) -> None:
    first, second = gateways
    pid = pid_from(second)
    assert first.stop() == 0
    # Its worker went with it; the second takes the lease and starts its own for the request.
    second.wait_for(rf"model whoami:1 lost worker pid {pid} ", seen_too=True)
    again = pid_from(second)
    assert again != pid
    second.wait_for(rf"model whoami:1 ready: worker pid {again} ", seen_too=True)
    assert worker_pids(second) == [again]


def test_a_gateway_that_loses_the_lease_while_alive_hands_its_workers_over(
    gateways: tuple[KetchServer, KetchServer], redis_server: RedisServer
) -> None:
    first, second = gateways
    pid = pid_from(second)  # started by the first, which holds the lease
    # The lease taken by another while the first lives on (as when Redis was out of its reach
    # for longer than the lease): the first stops sizing the pool, and lets its worker go.
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.set("ketch:pools:lease", "a-gateway-elsewhere", px=3000)
    finally:
        client.close()
    first.wait_for(
        rf"model whoami:1 lost worker pid {pid} .*: handed over: another gateway holds the "
        "pools lease",
        seen_too=True,
    )
    # Once that lease ends, one of the two takes it and starts the worker the load asks for.
    again = pid_from(first)
    assert again != pid
    assert pid_from(second) == again
    assert worker_pids(first) == worker_pids(second) == [again]
