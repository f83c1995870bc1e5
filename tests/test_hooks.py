"""The decision and observer hooks, implemented by a plugin loaded with --plugin, seen from a
running gateway over HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KetchServer

Start = Callable[..., KetchServer]

OBSERVER = """
import json
import os

import ketch

LOG = os.environ["HOOK_LOG"]


def _write(entry):
    with open(LOG, "a") as out:
        out.write(json.dumps(entry) + "\\n")


@ketch.hookimpl
def ketch_query_answered(app, query, answer):
    _write({"hook": "answered", "app": app, "query_id": query.id, "input": query.input,
            "output": answer["output"], "models": answer["models"]})


@ketch.hookimpl
def ketch_feedback_observed(app, query, feedback):
    _write({"hook": "feedback", "app": app, "query_id": query.id, "reward": feedback.reward,
            "rewards": dict(feedback.rewards)})


@ketch.hookimpl
def ketch_reward_of(app, model, prediction, label):
    # Classes, not distances: a probability above 0.5 means label 1.
    if isinstance(prediction, float) and label in (0, 1):
        return 1.0 if (prediction > 0.5) == bool(label) else 0.0
    return None


@ketch.hookimpl
def ketch_query_answered_too_late(app):
    pass
"""

APPS = """
import ketch


@ketch.model(min_replicas=1)
def high(xs):
    return [0.7 for _ in xs]


@ketch.model(min_replicas=1)
def low(xs):
    return [0.1 for _ in xs]


both = ketch.app("both", models=["high", "low"], policy="ensemble")
"""


def test_observers_see_answers_and_feedback_and_a_plugin_decides_rewards(
    start_server: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "hooks.jsonl"
    plugin = tmp_path / "observer.py"
    # The misspelt hook at the end must not load; the plugin without it must.
    plugin.write_text(OBSERVER.split("@ketch.hookimpl\ndef ketch_query_answered_too_late")[0])
    (tmp_path / "apps.py").write_text(APPS)
    monkeypatch.setenv("HOOK_LOG", str(log))
    server = start_server(tmp_path / "apps.py", "--plugin", str(plugin))
    answer = server.client.post("/apps/both/predict", json={"input": 5}).json()
    result = server.client.post(
        "/apps/both/feedback", json={"query_id": answer["query_id"], "label": 1}
    ).json()
    # ketch_reward_of from the plugin came before the built-in distance.
    assert result["rewards"] == {"high": 1.0, "low": 0.0}
    assert result["reward"] == 0.0  # the mean, 0.4, is class 0
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries == [
        {
            "hook": "answered",
            "app": "both",
            "query_id": answer["query_id"],
            "input": 5,
            "output": answer["output"],
            "models": ["high", "low"],
        },
        {
            "hook": "feedback",
            "app": "both",
            "query_id": answer["query_id"],
            "reward": 0.0,
            "rewards": {"high": 1.0, "low": 0.0},
        },
    ]


def test_a_plugin_implementing_an_unknown_hook_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_LOG", str(tmp_path / "hooks.jsonl"))
    plugin = tmp_path / "observer.py"
    plugin.write_text(OBSERVER)
    (tmp_path / "apps.py").write_text(APPS)
    server = KetchServer(tmp_path / "apps.py", "--plugin", str(plugin))
    try:
        assert server.process.wait(60) == 2
        server.wait_for_stderr(r"unknown hook 'ketch_query_answered_too_late'")
    finally:
        server.stop()


MODEL_OBSERVER = """
import json
import os

import ketch

LOG = os.environ["HOOK_LOG"]


def _write(entry):
    with open(LOG, "a") as out:
        out.write(json.dumps(entry) + "\\n")


@ketch.hookimpl
def ketch_worker_started(model, version, pid, host):
    _write({"hook": "started", "model": model, "version": version, "pid": pid, "host": host})


@ketch.hookimpl
def ketch_worker_exited(model, version, pid, host, reason):
    _write({"hook": "exited", "model": model, "pid": pid, "reason": reason})


@ketch.hookimpl
def ketch_pool_scaled(model, version, change, details):
    _write({"hook": "scaled", "model": model, "change": change, "details": details})


@ketch.hookimpl
def ketch_batch_done(model, version, size, compute_s, pid):
    _write({"hook": "batch", "model": model, "size": size, "pid": pid,
            "computed": compute_s is not None and compute_s >= 0})


@ketch.hookimpl
def ketch_request_done(model, version, inputs, latency_s, status):
    _write({"hook": "request", "model": model, "version": version, "inputs": inputs,
            "status": status, "timed": latency_s >= 0})
"""

MODELS = """
import ketch


@ketch.model(min_replicas=1)
def double(xs):
    return [2 * x for x in xs]


@ketch.model(min_replicas=1)
def broken(xs):
    raise ValueError("no")


@ketch.model(idle_timeout_s=0.5)
def sleepy(xs):
    return xs
"""

TOKEN = "observer-admin-token"


def test_observers_see_workers_pools_batches_and_requests(
    start_server: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "hooks.jsonl"
    plugin = tmp_path / "model_observer.py"
    plugin.write_text(MODEL_OBSERVER)
    (tmp_path / "models.py").write_text(MODELS)
    monkeypatch.setenv("HOOK_LOG", str(log))
    server = start_server(tmp_path / "models.py", "--plugin", str(plugin), "--admin-token", TOKEN)

    def told(hook: str) -> list[dict[str, Any]]:
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        return [entry for entry in entries if entry.pop("hook") == hook]

    # The warm pools' workers were told before "ketch: ready".
    started = {entry["model"]: entry for entry in told("started")}
    (double_worker,) = server.model_status("double")["workers"]
    assert started["double"] == {
        "model": "double",
        "version": "1",
        "pid": double_worker["pid"],
        "host": double_worker["host"],
    }
    assert set(started) == {"double", "broken"}

    # One batch of three inputs, told before its answer; a batch the model raised on is a
    # request done with a 500, and no batch done.
    assert server.predict("double", {"inputs": [1, 2, 3]}).json()["outputs"] == [2, 4, 6]
    assert server.predict("broken", {"input": 1}).status_code == 500
    assert told("batch") == [
        {"model": "double", "size": 3, "pid": double_worker["pid"], "computed": True}
    ]
    assert told("request") == [
        {"model": "double", "version": "1", "inputs": 3, "status": 200, "timed": True},
        {"model": "broken", "version": "1", "inputs": 1, "status": 500, "timed": True},
    ]

    # A pool at zero starts a worker for a request, and lets it go once idle.
    assert server.predict("sleepy", {"input": 7}).json()["output"] == 7
    server.wait_for(r"^ketch: model sleepy:1 scaled to zero")
    (sleepy_started,) = [e for e in told("started") if e["model"] == "sleepy"]
    (sleepy_exited,) = told("exited")
    assert sleepy_exited["model"] == "sleepy"
    assert sleepy_exited["pid"] == sleepy_started["pid"]
    assert "scaled down" in sleepy_exited["reason"]
    assert told("scaled") == [
        {"model": "sleepy", "change": "scaled_to_zero", "details": {"idle_timeout_s": 0.5}}
    ]

    # New bounds through the management API are a pool scaled too.
    response = server.client.patch(
        "/admin/models/double/pool",
        json={"max_replicas": 2},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code == 200, response.text
    assert told("scaled")[-1] == {
        "model": "double",
        "change": "pool_changed",
        "details": {"min_replicas": 1, "max_replicas": 2},
    }
