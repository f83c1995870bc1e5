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
    import os
    import multiprocess

    import ketch

    # Only the worker of gpu_only dies (discovery and other workers import this file too),
    # as it would on a machine without the GPU or native library it needs, while the fault
    # (a file here) lasts.
    FAULT = os.path.join(os.path.dirname(__file__), "no-gpu")
    if multiprocess.current_process().name.startswith("ketch-worker-gpu_only"):
        if os.path.exists(FAULT):
            raise RuntimeError("no GPU here")

    @ketch.model
    def gpu_only(xs):
        return xs

    @ketch.model
    def double(xs):
        return [2 * x for x in xs]
"""


def test_a_crash_looping_model_backs_off_answers_503_and_heals_once_the_fault_is_gone(
    start_server: Start, write_models: Callable[..., Path]
) -> None:
    source = write_models(CRASH_LOOP)
    fault = source.parent / "no-gpu"
    fault.touch()
    server = start_server(source, "--workers-per-model", "1")
    looping = r"model gpu_only:1 crash-looping: (\d+) workers in a row exited early; the last: "
    looping += r"worker pid \d+ exited with code 2"
    # Each quick exit in a row doubles the wait: 1.6 s after the fifth, 3.2 s after the sixth.
    server.wait_for(r"; next attempt in 3\.2 s$", seen_too=True)
    counts = [m.group(1) for line in server.seen if (m := re.search(looping, line))]
    delays = [
        m.group(1) for line in server.seen if (m := re.search(r"next attempt in (.+) s$", line))
    ]
    assert (counts, delays) == (["5", "6"], ["1.6", "3.2"])

    response = server.predict("gpu_only", {"input": 1})
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert "is crash-looping" in error and "the next worker starts in" in error
    # The tail of what the worker printed: the traceback, then the line naming the model.
    assert "its last output:" in error
    assert 'raise RuntimeError("no GPU here")' in error
    assert "cannot load" in error and "gpu_only: RuntimeError: no GPU here" in error
    status = server.model_status("gpu_only")
    assert status["state"] == "unhealthy"
    assert status["worker_exits"] >= 6
    assert "no GPU here" in status["last_error"]
    backoff = status["backoff"]
    assert backoff["quick_exits"] >= 6 and "no GPU here" in backoff["reason"]
    assert 0 < backoff["next_attempt_in_s"] <= backoff["delay_s"]
    assert server.client.get("/v2/health/ready").status_code == 503
    # The healthy model is untouched.
    assert server.predict("double", {"input": 2}).json()["output"] == 4

    # Never given up on: once the fault is gone, the next attempt serves.
    fault.unlink()
    server.wait_for(r"model gpu_only:1 ready: worker pid")
    assert server.predict("gpu_only", {"input": 7}).json()["output"] == 7
    status = server.model_status("gpu_only")
    assert (status["state"], status["backoff"]) == ("ready", None)
    assert server.client.get("/v2/health/ready").status_code == 200


def test_workers_killed_from_outside_after_joining_never_make_a_crash_loop(
    start_server: Start, write_models: Callable[..., Path]
) -> None:
    """An OOM killer or an operator, not a fault of the model: each kill is replaced at once,
    however many come in a row."""
    server = start_server(write_models(CRASH_LOOP), "--workers-per-model", "1")
    pid = int(server.wait_for(r"model double:1 ready: worker pid (\d+)", seen_too=True).group(1))
    for _ in range(7):
        os.kill(pid, signal.SIGKILL)
        server.wait_for(rf"lost worker pid {pid} ")
        pid = int(server.wait_for(r"model double:1 ready: worker pid (\d+)").group(1))
    assert not any("crash-looping" in line for line in server.seen)
    status = server.model_status("double")
    assert (status["state"], status["backoff"]) == ("ready", None)
    assert server.predict("double", {"input": 4}).json()["output"] == 8
