"""``preload=True``: a per-model template keeps the model's imports warm while its pool is at
zero, and every worker is forked from it."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import KILLED_REASON, KetchServer

Start = Callable[..., KetchServer]
WriteModels = Callable[..., Path]

PRELOADED = """
    import os

    import ketch

    # Runs where the module is imported: in the template, never again in its workers.
    IMPORTED_IN = os.getpid()
    print(f"heavy imports in pid {IMPORTED_IN}", flush=True)

    @ketch.model(preload=True, idle_timeout_s=0.5)
    def heavy(xs):
        return [
            {"imported_in": IMPORTED_IN, "pid": os.getpid(), "parent": os.getppid(), "x": x}
            for x in xs
        ]

    @ketch.model
    def plain(xs):
        return [os.getpid() for _ in xs]
"""

BROKEN_TEMPLATE = """
    import os

    import ketch

    @ketch.model(preload=True)
    def broken(xs):
        return xs

    # Fails only in the template (discovery runs in a process named ketch-discover).
    import multiprocess
    if multiprocess.current_process().name.startswith("ketch-template-"):
        raise ImportError("libheavy.so: cannot open shared object file")
"""


@pytest.fixture
def preloaded(start_server: Start, write_models: WriteModels) -> KetchServer:
    server = start_server(write_models(PRELOADED))
    server.wait_for(r"model heavy:1 template ready: pid \d+", seen_too=True)
    return server


def test_preloaded_model_at_zero_runs_only_its_template_reported_as_such(
    preloaded: KetchServer,
) -> None:
    status = preloaded.model_status("heavy")
    assert (status["state"], status["replicas"]["ready"], status["workers"]) == ("zero", 0, [])
    template = status["template"]
    assert template["state"] == "ready" and template["rss_mb"] > 0
    process = psutil.Process(template["pid"])
    assert process.children() == []  # no worker yet: just the template, with imports done
    preloaded.wait_for_stderr(rf"\[heavy:1 template pid {template['pid']}\] heavy imports")
    # A model without preload has no template: at zero it has no process at all.
    assert preloaded.model_status("plain")["template"] is None


def test_workers_fork_from_the_template_without_importing_again(
    preloaded: KetchServer,
) -> None:
    template_pid = preloaded.model_status("heavy")["template"]["pid"]
    first = preloaded.predict("heavy", {"input": 1}).json()["output"]
    assert first["imported_in"] == template_pid  # the module was imported once, by the template
    assert first["parent"] == template_pid and first["pid"] != template_pid

    # Idle for idle_timeout_s: the worker goes, the template stays, the next request forks anew.
    preloaded.wait_for(rf"model heavy:1 lost worker pid {first['pid']} .*scaled down")
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(first["pid"]).wait(10)
    status = preloaded.model_status("heavy")
    assert (status["state"], status["template"]["pid"]) == ("zero", template_pid)
    second = preloaded.predict("heavy", {"input": 2}).json()["output"]
    assert second["pid"] != first["pid"]
    assert (second["parent"], second["imported_in"], second["x"]) == (template_pid, template_pid, 2)
    assert preloaded.model_status("heavy")["cold_starts"] == 2


def test_a_dead_template_is_replaced_and_its_model_still_served(
    preloaded: KetchServer,
) -> None:
    old = preloaded.model_status("heavy")["template"]["pid"]
    os.kill(old, signal.SIGKILL)
    new = int(preloaded.wait_for(r"model heavy:1 template ready: pid (\d+)").group(1))
    assert new != old
    output = preloaded.predict("heavy", {"input": 3}).json()["output"]
    assert (output["parent"], output["imported_in"]) == (new, new)


def test_worker_killed_under_a_template_is_noticed_and_replaced(
    preloaded: KetchServer,
) -> None:
    victim = preloaded.predict("heavy", {"input": 1}).json()["output"]["pid"]
    os.kill(victim, signal.SIGKILL)
    preloaded.wait_for(rf"lost worker pid {victim} .*{KILLED_REASON}")
    output = preloaded.predict("heavy", {"input": 4}).json()["output"]
    assert output["pid"] != victim and output["x"] == 4


def test_template_that_cannot_load_the_model_crash_loops_with_its_output(
    start_server: Start, write_models: WriteModels
) -> None:
    server = start_server(write_models(BROKEN_TEMPLATE))
    looping = r"model broken:1 crash-looping: (\d+) templates in a row exited early; the last: "
    looping += "its template could not load the model"
    server.wait_for(looping, seen_too=True)
    # A wait of 3.2 s follows the sixth: a request meanwhile is answered at once.
    assert server.wait_for(looping).group(1) == "6"
    response = server.predict("broken", {"input": 1})
    assert response.status_code == 503
    error = response.json()["error"]
    assert "template pid" in error and "exited with code 2" in error
    assert "ImportError: libheavy.so: cannot open shared object file" in error
    assert server.model_status("broken")["template"] is None


SLOW_TEMPLATE = """
    import time

    import ketch
    import multiprocess

    # The template's imports take a while (a framework, weights): only in the template.
    if multiprocess.current_process().name.startswith("ketch-template-"):
        time.sleep(1.5)

    @ketch.model(preload=True)
    def slow(xs):
        return xs
"""


def test_ready_waits_for_the_template_so_the_first_request_pays_no_import(
    start_server: Start, write_models: WriteModels
) -> None:
    server = start_server(write_models(SLOW_TEMPLATE))  # returns once "ketch: ready" is out
    lines = server.seen
    template_ready = next(i for i, line in enumerate(lines) if "template ready" in line)
    assert template_ready < lines.index("ketch: ready")
    assert server.client.get("/v2/health/ready").status_code == 200
    assert server.client.get("/v2/models/slow/ready").status_code == 200
    assert server.predict("slow", {"input": 1}).json()["output"] == 1
