"""Pipelines (ketch.pipeline) against a real server: chains, parallel steps joined, a model run
only when the step before is unsure, one deadline for the whole query, per-step counts in
GET /apps, and the errors a user gets for a pipeline that fails or cannot be served."""

from __future__ import annotations

import concurrent.futures
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KetchServer

Start = Callable[..., KetchServer]
TOKEN = "test-admin-token"

MODELS = """
import time

import ketch


@ketch.model
def detect(xs):
    return [{"boxes": [x, x + 1]} for x in xs]


@ketch.model
def crop(xs):
    return [sum(x["boxes"]) for x in xs]


@ketch.model
def double(xs):
    return [x * 2 for x in xs]


@ketch.model
def triple(xs):
    return [x * 3 for x in xs]


@ketch.model
def cheap(xs):
    return [{"label": "cheap", "confidence": 0.9 if x >= 0 else 0.3, "x": x} for x in xs]


@ketch.model
def big(xs):
    return [{"label": "big", "confidence": 0.99, "x": x} for x in xs]


@ketch.model
def slow(xs):
    time.sleep(1.0)
    return xs


@ketch.model
def broken(xs):
    raise RuntimeError("the model broke")


@ketch.model(max_batch_size=16, max_delay_ms=50)
def batch_size(xs):
    time.sleep(0.05)
    return [len(xs) for _ in xs]


chain = ketch.pipeline(
    "chain", steps=["detect", "crop", ketch.parallel("double", "triple", join="dict")]
)
cascade = ketch.pipeline("cascade", steps=["cheap", ketch.when_unsure("big", below=0.8)])
late = ketch.pipeline("late", steps=["double", "slow", "triple"], slo_ms=300)
failing = ketch.pipeline("failing", steps=["double", "broken"])
batched = ketch.pipeline("batched", steps=["double", "batch_size"])
"""


@pytest.fixture
def server(start_server: Start, write_models: Callable[[str], Path]) -> KetchServer:
    return start_server(write_models(MODELS), "--admin-token", TOKEN)


def ask(server: KetchServer, pipeline: str, value: Any) -> Any:
    answer = server.client.post(f"/apps/{pipeline}/predict", json={"input": value})
    assert answer.status_code == 200, answer.text
    return answer.json()


def pipeline_status(server: KetchServer, name: str) -> dict[str, Any]:
    found = [a for a in server.client.get("/apps").json()["apps"] if a["name"] == name]
    assert found, f"no {name} in GET /apps"
    return found[0]  # type: ignore[no-any-return]


def test_each_step_feeds_the_next_and_parallel_models_are_joined(server: KetchServer) -> None:
    answer = ask(server, "chain", 1)
    # detect(1) = boxes [1, 2]; crop = 3; double and triple of 3, joined by model.
    assert answer["output"] == {"double": 6, "triple": 9}
    assert answer["models"] == ["detect", "crop", "double", "triple"]
    assert [(s["step"], s["models"], s["ran"]) for s in answer["steps"]] == [
        (1, ["detect"], True),
        (2, ["crop"], True),
        (3, ["double", "triple"], True),
    ]
    assert all(s["ms"] > 0 for s in answer["steps"])


def test_a_model_runs_when_the_step_before_is_unsure_and_takes_its_place(
    server: KetchServer,
) -> None:
    sure = ask(server, "cascade", 5)
    assert sure["output"]["label"] == "cheap"
    assert sure["models"] == ["cheap"]
    assert sure["steps"][1]["ran"] is False
    assert "confidence 0.9 >= 0.8" in sure["steps"][1]["skipped_because"]
    unsure = ask(server, "cascade", -1)
    # big got cheap's input, not cheap's output, and only big made the answer.
    assert unsure["output"] == {"label": "big", "confidence": 0.99, "x": -1}
    assert unsure["models"] == ["big"]
    assert unsure["confidence"] == 0.99
    status = pipeline_status(server, "cascade")
    assert status["kind"] == "pipeline"
    assert status["queries"] == 2
    first, second = status["step_counts"]
    assert (first["runs"], first["skipped"], first["share"]) == (2, 0, 1.0)
    assert (second["runs"], second["skipped"], second["share"]) == (1, 1, 0.5)
    assert second["latency_ms"]["p50"] > 0


def test_one_deadline_bounds_the_whole_pipeline(server: KetchServer) -> None:
    answer = server.client.post("/apps/late/predict", json={"input": 1})
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"].startswith("pipeline 'late': step 2 (slow) failed: ")
    assert answer.json()["step"] == 2
    # The step after the late one was never asked; the server goes on serving.
    assert pipeline_status(server, "late")["step_counts"][2]["runs"] == 0
    assert ask(server, "chain", 1)["output"] == {"double": 6, "triple": 9}
    # A longer deadline of the request's own lets it through.
    slower = server.client.post("/apps/late/predict", json={"input": 1, "timeout_ms": 20000})
    assert slower.status_code == 200, slower.text
    assert slower.json()["output"] == 6


def test_a_failing_step_is_named_and_the_pipeline_goes_on_serving(server: KetchServer) -> None:
    answer = server.client.post("/apps/failing/predict", json={"input": 1})
    assert answer.status_code == 500, answer.text
    error = answer.json()["error"]
    assert error.startswith("pipeline 'failing': step 2 (broken) failed: ")
    assert "the model broke" in error
    status = pipeline_status(server, "failing")
    assert (status["queries"], status["errors"]) == (1, 1)
    assert status["step_counts"][1]["errors"] == 1
    assert ask(server, "cascade", 5)["models"] == ["cheap"]


def test_each_step_keeps_its_own_batching_across_queries(server: KetchServer) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: ask(server, "batched", i), range(16)))
    # batch_size answers how many inputs its batch held: queries of the pipeline were batched.
    assert max(a["output"] for a in answers) > 1


def test_a_pipeline_takes_no_feedback(server: KetchServer) -> None:
    answer = ask(server, "chain", 1)
    told = server.client.post(
        "/apps/chain/feedback", json={"query_id": answer["query_id"], "reward": 1}
    )
    assert told.status_code == 400, told.text
    assert "is a pipeline, which takes no feedback" in told.json()["error"]


def test_a_model_a_pipeline_uses_cannot_be_removed_from_under_it(server: KetchServer) -> None:
    removed = server.client.delete(
        "/admin/models/crop", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert removed.status_code == 409, removed.text
    assert "chain" in removed.json()["error"]
    assert ask(server, "chain", 1)["output"] == {"double": 6, "triple": 9}


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        (
            "p = ketch.pipeline('p', steps=['good', 'missing'])",
            "pipeline 'p' names 'missing': Request for unknown model: 'missing' is not found",
        ),
        (
            "a = ketch.app('p', models=['good'])\np = ketch.pipeline('p', steps=['good'])",
            "pipeline 'p': an application has that name",
        ),
        (
            "p = ketch.pipeline('p', steps=[ketch.when_unsure('good', below=0.5)])",
            "it needs a step before it",
        ),
    ],
)
def test_a_pipeline_that_cannot_be_served_stops_the_start_with_the_reason(
    tmp_path: Path, declaration: str, message: str
) -> None:
    source = tmp_path / "pipes.py"
    source.write_text(f"import ketch\n@ketch.model\ndef good(xs):\n    return xs\n{declaration}\n")
    server = KetchServer(source)
    try:
        assert server.process.wait(60) == 2
        server.wait_for_stderr(re.escape(message))
    finally:
        server.stop()


def test_a_pipeline_added_through_the_management_api_is_served_and_removed(
    server: KetchServer,
) -> None:
    admin = {"Authorization": f"Bearer {TOKEN}"}
    body = {"name": "added", "steps": ["double", {"step": "model", "model": "triple"}]}
    made = server.client.post("/admin/pipelines", json=body, headers=admin)
    assert made.status_code == 201, made.text
    assert made.json()["pipeline"]["kind"] == "pipeline"
    assert ask(server, "added", 2)["output"] == 12
    again = server.client.post("/admin/pipelines", json=body, headers=admin)
    assert again.status_code == 409, again.text
    wrong = {"name": "wrong", "steps": ["double", {"step": "parallel", "models": ["triple"]}]}
    refused = server.client.post("/admin/pipelines", json=wrong, headers=admin)
    assert refused.status_code == 400, refused.text
    assert "parallel needs two models or more" in refused.json()["error"]
    missing = server.client.post(
        "/admin/pipelines", json={"name": "m", "steps": ["nope"]}, headers=admin
    )
    assert missing.status_code == 400, missing.text
    assert "pipeline 'm' names 'nope'" in missing.json()["error"]
    removed = server.client.delete("/admin/apps/added", headers=admin)
    assert removed.status_code == 200, removed.text
    assert server.client.post("/apps/added/predict", json={"input": 2}).status_code == 404
