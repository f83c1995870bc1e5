"""Worker pools: scale from zero on demand, out under load, back to zero when idle."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from ketch.pools.scaling import ScaleState, desired_replicas, scale_step
from ketch.specs.models import PoolSpec
from tests.conftest import KetchServer

Start = Callable[..., KetchServer]
WriteModels = Callable[..., Path]

# -- the pure decision --------------------------------------------------------------------------

POOL = PoolSpec(min_replicas=0, max_replicas=4, idle_timeout_s=30, target_inflight=2)


def test_desired_replicas_follow_load_within_bounds() -> None:
    assert desired_replicas(POOL, active=0, idle_s=1e9) == 0
    assert desired_replicas(POOL, active=0, idle_s=5) == 1  # recent traffic keeps one warm
    assert desired_replicas(POOL, active=3, idle_s=0) == 2
    assert desired_replicas(POOL, active=100, idle_s=0) == 4
    floor = PoolSpec(min_replicas=2, max_replicas=4)
    assert desired_replicas(floor, active=0, idle_s=1e9) == 2


def test_scale_up_is_immediate() -> None:
    state = ScaleState()
    assert scale_step(POOL, current=0, active=1, idle_s=0, now=0, state=state) == 1
    assert scale_step(POOL, current=1, active=7, idle_s=0, now=0, state=state) == 3


def test_scale_down_waits_for_a_whole_idle_period_and_never_flaps() -> None:
    state = ScaleState()
    # Load that swings between needing 4 and 2 workers every second never shrinks the pool.
    steps = [
        scale_step(POOL, current=4, active=8 if t % 2 else 4, idle_s=0, now=t, state=state)
        for t in range(100)
    ]
    assert steps == [0] * 100
    # A sustained surplus sheds one worker per idle period.
    state = ScaleState()
    assert scale_step(POOL, current=4, active=2, idle_s=0, now=0, state=state) == 0
    assert scale_step(POOL, current=4, active=2, idle_s=0, now=29, state=state) == 0
    assert scale_step(POOL, current=4, active=2, idle_s=0, now=30, state=state) == -1
    assert scale_step(POOL, current=3, active=2, idle_s=0, now=31, state=state) == 0
    assert scale_step(POOL, current=3, active=2, idle_s=0, now=60, state=state) == -1


def test_without_traffic_the_pool_goes_straight_to_zero() -> None:
    state = ScaleState()
    assert scale_step(POOL, current=3, active=0, idle_s=30, now=100, state=state) == 0
    assert scale_step(POOL, current=3, active=0, idle_s=60, now=130, state=state) == -3


def test_a_pool_over_its_bound_sheds_the_excess_at_once() -> None:
    # Only workers started by hand bring a pool past max_replicas: no idle period to wait.
    state = ScaleState()
    assert scale_step(POOL, current=6, active=100, idle_s=0, now=0, state=state) == -2
    assert scale_step(POOL, current=4, active=100, idle_s=0, now=1, state=state) == 0


# -- real pools ---------------------------------------------------------------------------------

POOLED = """
    import os
    import time

    import multiprocess

    import ketch

    @ketch.model(idle_timeout_s=0.5)
    def double(xs):
        return [2 * x for x in xs]

    @ketch.model(max_replicas=3, target_inflight=1, idle_timeout_s=60, max_batch_size=1)
    def slow(xs):
        time.sleep(0.2 * len(xs))
        return [os.getpid()] * len(xs)

    # Its worker takes far longer to load than its requests may wait.
    if multiprocess.current_process().name.startswith("ketch-worker-sluggish"):
        time.sleep(30)

    @ketch.model(cold_start_timeout_s=0.5)
    def sluggish(xs):
        return xs

    # Its workers die as they load, fewer times than it takes to be marked unhealthy
    # within its cold-start deadline.
    if multiprocess.current_process().name.startswith("ketch-worker-flaky"):
        raise RuntimeError("weights file missing")

    @ketch.model(cold_start_timeout_s=1)
    def flaky(xs):
        return xs
"""


@pytest.fixture
def pooled(start_server: Start, write_models: WriteModels) -> KetchServer:
    return start_server(write_models(POOLED))


def burst(server: KetchServer, model: str, count: int) -> list[httpx.Response]:
    async def send() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(
                *(client.post(f"/models/{model}/predict", json={"input": i}) for i in range(count))
            )

    return asyncio.run(send())


def test_burst_to_a_pool_at_zero_is_all_answered_then_the_pool_returns_to_zero(
    pooled: KetchServer,
) -> None:
    status = pooled.model_status("double")
    assert (status["state"], status["replicas"]["ready"]) == ("zero", 0)

    responses = burst(pooled, "double", 200)
    assert [r.status_code for r in responses] == [200] * 200
    assert [r.json()["output"] for r in responses] == [2 * i for i in range(200)]
    assert pooled.model_status("double")["cold_starts"] == 1
    pid = int(pooled.wait_for(r"model double:1 ready: worker pid (\d+)", seen_too=True).group(1))

    # Idle for idle_timeout_s (0.5 s): the worker is let go and its process exits.
    pooled.wait_for(rf"model double:1 lost worker pid {pid} .*scaled down")
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(10)
    assert not psutil.pid_exists(pid)
    status = pooled.model_status("double")
    assert (status["state"], status["workers"]) == ("zero", [])
    assert status["worker_exits"] == 0  # a scale-down is not a crash
    # And it comes back on demand.
    assert pooled.predict("double", {"input": 4}).json()["output"] == 8
    assert pooled.model_status("double")["cold_starts"] == 2


def test_pool_grows_under_load_up_to_max_replicas(pooled: KetchServer) -> None:
    responses = burst(pooled, "slow", 12)
    assert all(r.status_code == 200 for r in responses)
    pids = {r.json()["output"] for r in responses}
    assert 1 < len(pids) <= 3
    assert pooled.model_status("slow")["replicas"]["ready"] <= 3


def test_requests_that_wait_too_long_for_a_cold_start_get_503(pooled: KetchServer) -> None:
    response = pooled.predict("sluggish", {"input": 1})
    assert response.status_code == 503
    body = response.json()
    assert body["model"] == "sluggish"
    assert "got no worker within 0.5 s (a worker is still starting)" in body["error"]
    assert pooled.predict("double", {"input": 1}).json()["output"] == 2


def test_cold_start_503_names_the_failed_start_and_its_output(pooled: KetchServer) -> None:
    response = pooled.predict("flaky", {"input": 1})
    assert response.status_code == 503
    error = response.json()["error"]
    # Within 1 s its workers have failed once or more (4 times at most: then, at about 1.5 s,
    # it would be unhealthy), and the answer quotes the last failure's output.
    assert "'flaky:1' got no worker within 1 s" in error
    assert re.search(r"the last attempt: worker pid \d+ exited with code 2", error)
    assert "RuntimeError: weights file missing" in error
    assert pooled.predict("double", {"input": 1}).json()["output"] == 2


def test_models_endpoint_shows_queued_and_in_flight_requests_under_load(
    pooled: KetchServer,
) -> None:
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(burst, pooled, "slow", 12)
        deadline = time.monotonic() + 30
        seen: list[tuple[int, int, int]] = []
        while time.monotonic() < deadline and not load.done():
            status = pooled.model_status("slow")
            seen.append((status["queue_depth"], status["in_flight"], status["active_requests"]))
            if status["queue_depth"] and status["in_flight"]:
                break
        assert all(r.status_code == 200 for r in load.result())
    queued, in_flight, active = seen[-1]
    assert queued >= 1 and in_flight >= 1 and active >= queued + in_flight, seen
    status = pooled.model_status("slow")
    assert (status["queue_depth"], status["in_flight"], status["active_requests"]) == (0, 0, 0)
