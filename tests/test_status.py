"""Status for people and scripts: `ketch serve --log-format json` and `ketch status`."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import START_DEADLINE_S, TEST_HEARTBEAT, KetchProcess, KetchServer

MODELS = """
import ketch

@ketch.model(idle_timeout_s=0.5)
def double(xs):
    return [2 * x for x in xs]

@ketch.model
def triple(xs):
    return [3 * x for x in xs]

both = ketch.app("both", models=["double", "triple"], policy="split")
chained = ketch.pipeline(
    "chained", steps=["double", ketch.when_unsure("triple", below=0.5)]
)
"""


def next_event(server: KetchProcess, kind: str) -> dict[str, Any]:
    """The next JSON line of event ``kind``; every line on the way must be JSON too."""
    deadline = time.monotonic() + START_DEADLINE_S
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = server.lines.get(timeout=remaining)
        except queue.Empty:
            break
        assert line is not None, f"exited; stderr: {server.stderr_lines[-20:]}"
        server.seen.append(line)
        event: dict[str, Any] = json.loads(line)
        assert event["ts"].endswith("Z")
        if event["event"] == kind:
            return event
    raise AssertionError(f"no {kind} event; stdout: {server.seen}")


def test_json_log_format(write_models: Callable[..., Path]) -> None:
    models = write_models(MODELS)
    server = KetchProcess(
        [
            "serve",
            str(models),
            "--port",
            "0",
            "--broker",
            "tcp://127.0.0.1:*",
            *TEST_HEARTBEAT,
            "--log-format",
            "json",
            "--log-level",
            "info",
        ]
    )
    try:
        url = next_event(server, "listening")["url"]
        app = next_event(server, "app")
        assert app["app"] == "both" and app["models"] == ["double", "triple"]
        next_event(server, "ready")
        response = httpx.post(f"{url}/models/double/predict", json={"input": [1, 2]}, timeout=30)
        assert response.status_code == 200
        ready = next_event(server, "model_ready")
        assert (ready["model"], ready["version"]) == ("double", "1")
        assert isinstance(ready["pid"], int) and ready["host"]
        lost = next_event(server, "worker_lost")
        assert lost["pid"] == ready["pid"] and "scaled down" in lost["reason"]
        zero = next_event(server, "scaled_to_zero")
        assert zero == {**zero, "model": "double", "version": "1", "idle_timeout_s": 0.5}
    finally:
        server.stop()
    logged = [json.loads(line) for line in server.stderr_lines if line.startswith("{")]
    assert any(r["logger"] == "ketch.server" and r["level"] == "INFO" for r in logged)


def test_text_format_says_when_a_pool_is_back_to_zero(
    write_models: Callable[..., Path], start_server: Callable[..., KetchServer]
) -> None:
    server = start_server(write_models(MODELS))
    assert server.predict("double", {"input": [1]}).status_code == 200
    server.wait_for(r"^ketch: model double:1 ready: worker pid \d+ on ")
    server.wait_for(r"^ketch: model double:1 scaled to zero after 0.5 s without requests$")


def ketch_status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ketch.cli.main", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_status_prints_models_and_apps(
    write_models: Callable[..., Path], start_server: Callable[..., KetchServer]
) -> None:
    server = start_server(write_models(MODELS))
    assert server.predict("triple", {"input": [1]}).status_code == 200
    result = ketch_status("--url", server.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("MODEL"))
    for column in ("STATE", "READY", "STARTING", "QUEUED", "IN FLIGHT", "COLD STARTS", "P99 MS"):
        assert column in header
    triple = next(line for line in lines if line.startswith("triple *")).split()
    assert triple[2:4] == ["1", "ready"]
    p50, p99 = float(triple[-2]), float(triple[-1])  # of its one request
    assert 0 < p50 <= p99
    double = next(line for line in lines if line.startswith("double *")).split()
    assert double[-2:] == ["-", "-"]  # no request yet
    app = next(line for line in lines if line.startswith("both "))
    assert "split" in app and "double, triple" in app
    pipeline = next(line for line in lines if line.startswith("chained "))
    assert "(pipeline)" in pipeline and "double -> triple?" in pipeline


def test_status_of_an_unreachable_server_exits_2() -> None:
    result = ketch_status("--url", "http://127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.startswith("ketch: error: cannot reach http://127.0.0.1:1/models")


def test_status_of_a_server_with_a_predict_token(
    write_models: Callable[..., Path],
    start_server: Callable[..., KetchServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KETCH_PREDICT_TOKEN", "predict-token")
    server = start_server(write_models(MODELS))
    without = {k: v for k, v in os.environ.items() if k != "KETCH_PREDICT_TOKEN"}
    refused = ketch_status("--url", server.url, env=without)
    assert refused.returncode == 1
    assert refused.stderr == (
        "ketch: error: this route needs the predict token (or the admin token) as "
        "'Authorization: Bearer <token>' (HTTP 401)\n"
    )
    wrong = ketch_status("--url", server.url, "--token", "wrong", env=without)
    assert wrong.returncode == 1
    assert "the bearer token is not the predict token" in wrong.stderr
    # KETCH_PREDICT_TOKEN, as the server got it.
    result = ketch_status("--url", server.url)
    assert result.returncode == 0, result.stderr
    assert any(line.startswith("triple *") for line in result.stdout.splitlines())
