"""The decision and observer hooks, implemented by a plugin loaded with --plugin, seen from a
running gateway over HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

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
