"""Workers that die or go silent with requests in flight: every request is still answered."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import KILLED_REASON, KetchServer

Start = Callable[..., KetchServer]

#: A small file, so that two workers per model start quickly.
FRAGILE = """
    import os
    import signal
    import time

    import ketch

    @ketch.model
    def double(xs):
        return [2 * x for x in xs]

    @ketch.model
    def slow(xs):
        # Says on stdout (shared with `ketch serve`) when it computes, so tests know when to strike.
        print(f"slow: computing {len(xs)} inputs in pid {os.getpid()}", flush=True)
        time.sleep(sum(xs))
        return list(xs)

    @ketch.model
    def suicide(xs):
        # Kills its own worker on every batch, like a segfault in native code.
        os.kill(os.getpid(), signal.SIGKILL)
        return list(xs)
"""


@pytest.fixture
def fragile(write_models: Callable[..., Path]) -> Path:
    return write_models(FRAGILE)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=16) as executor:
        yield executor


def post_all(
    pool: ThreadPoolExecutor, server: KetchServer, model: str, inputs: list[float]
) -> list[Future[httpx.Response]]:
    def post(x: float) -> httpx.Response:
        return httpx.post(f"{server.url}/models/{model}/predict", json={"input": x}, timeout=60)

    return [pool.submit(post, x) for x in inputs]


def test_sigkill_with_requests_in_flight_retries_them_on_another_worker(
    start_server: Start, pool: ThreadPoolExecutor, fragile: Path
) -> None:
    server = start_server(fragile, "--workers-per-model", "2")
    assert server.model_status("slow")["replicas"]["ready"] == 2
    futures = post_all(pool, server, "slow", [0.3] * 6)
    victim = int(server.wait_for_stderr(r"slow: computing \d+ inputs in pid (\d+)").group(1))
    os.kill(victim, signal.SIGKILL)

    responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 6
    assert [r.json()["output"] for r in responses] == [0.3] * 6
    server.wait_for(rf"lost worker pid {victim} .*{KILLED_REASON}")
    # The supervisor replaces the dead worker.
    server.wait_for(r"model slow:1 ready")
    pids = {w["pid"] for w in server.model_status("slow")["workers"]}
    assert victim not in pids and len(pids) == 2


def test_only_worker_killed_is_restarted_and_the_request_still_answered(
    start_server: Start, pool: ThreadPoolExecutor, fragile: Path
) -> None:
    server = start_server(fragile)
    (future,) = post_all(pool, server, "slow", [0.2])
    victim = int(server.wait_for_stderr(r"slow: computing 1 inputs in pid (\d+)").group(1))
    os.kill(victim, signal.SIGKILL)
    response = future.result()
    assert (response.status_code, response.json()["output"]) == (200, 0.2)
    assert server.model_status("slow")["workers"][0]["pid"] != victim


def test_request_that_kills_every_worker_gets_503_after_one_retry(
    start_server: Start, fragile: Path
) -> None:
    server = start_server(fragile)
    response = server.predict("suicide", {"input": 1})
    assert response.status_code == 503
    body = response.json()
    assert body["model"] == "suicide"
    assert "was lost while computing this request" in body["error"]
    assert "after 2 attempts" in body["error"]
    # Everything else is still served, and the model's worker comes back.
    assert server.predict("double", {"input": 4}).json()["output"] == 8
    server.wait_for(r"model suicide:1 ready")


def test_silent_worker_is_dropped_by_heartbeat_and_its_requests_retried(
    start_server: Start, pool: ThreadPoolExecutor, fragile: Path
) -> None:
    server = start_server(fragile, "--workers-per-model", "2")
    futures = post_all(pool, server, "slow", [0.3] * 4)
    victim = int(server.wait_for_stderr(r"slow: computing \d+ inputs in pid (\d+)").group(1))
    os.kill(victim, signal.SIGSTOP)  # alive but silent: only heartbeats can tell
    try:
        server.wait_for(rf"lost worker pid {victim} .*no heartbeat")
        responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 4
    finally:
        os.kill(victim, signal.SIGCONT)


CRASH_LOOP = """
    import multiprocess

    import ketch

    # Only the worker of gpu_only dies (discovery and other workers import this file too),
    # as it would on a machine without the GPU or native library it needs.
    if multiprocess.current_process().name.startswith("ketch-worker-gpu_only"):
        raise RuntimeError("no GPU here")

    @ketch.model
    def gpu_only(xs):
        return xs

    @ketch.model
    def double(xs):
        return [2 * x for x in xs]
"""


def test_model_whose_workers_crash_loop_is_marked_unhealthy(
    start_server: Start, write_models: Callable[..., Path]
) -> None:
    server = start_server(write_models(CRASH_LOOP), "--workers-per-model", "1")
    cause = server.wait_for(r"model gpu_only:1 unhealthy: (.*)", seen_too=True).group(1)
    assert re.search(r"5 workers in a row exited early; the last: worker pid \d+ exited", cause)

    response = server.predict("gpu_only", {"input": 1})
    assert response.status_code == 503
    error = response.json()["error"]
    assert "is unhealthy" in error
    # The tail of what the worker printed: the traceback, then the line naming the model.
    assert "its last output:" in error
    assert 'raise RuntimeError("no GPU here")' in error
    assert "cannot load" in error and "gpu_only: RuntimeError: no GPU here" in error
    status = server.model_status("gpu_only")
    assert status["state"] == "unhealthy"
    assert status["worker_exits"] == 5
    assert "no GPU here" in status["last_error"]
    assert server.client.get("/v2/health/ready").status_code == 503
    # The healthy model is untouched.
    assert server.predict("double", {"input": 2}).json()["output"] == 4
