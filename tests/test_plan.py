"""`ketch plan`: a pipeline of the served file planned from a profile `ketch profile` measured,
to a p99 objective under a Poisson rate or a trace; the plan written as JSON and printed; and
the errors a user gets for what cannot be planned."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import KetchServer

MODELS = """
import time

import ketch


@ketch.model(max_batch_size=8, inputs=[ketch.TensorSpec("x", "float32", (2,))])
def first(xs):
    time.sleep(0.003 + 0.001 * len(xs))
    return [[float(sum(x)), 1.0] for x in xs]


@ketch.model(max_batch_size=8, inputs=[ketch.TensorSpec("x", "float32", (2,))])
def second(xs):
    time.sleep(0.005 + 0.002 * len(xs))
    return [{"confidence": 0.5} for x in xs]


@ketch.model(max_batch_size=8, inputs=[ketch.TensorSpec("x", "float32", (2,))])
def third(xs):
    time.sleep(0.006 + 0.003 * len(xs))
    return [1.0 for x in xs]


chain = ketch.pipeline("chain", steps=["first", "second", ketch.when_unsure("third", below=0.8)])
"""


def ketch_command(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ketch.cli.main", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )


def profiled(folder: Path) -> None:
    done = ketch_command(folder, "profile", "models.py", "--cpus", "1", "--repeats", "5")
    assert done.returncode == 0, done.stderr


def test_a_pipeline_is_planned_from_its_profile_within_the_objective(
    write_models: Callable[[str], Path], tmp_path: Path
) -> None:
    write_models(MODELS)
    profiled(tmp_path)
    done = ketch_command(
        tmp_path,
        "plan",
        "models.py",
        "chain",
        "--profile",
        "profile.json",
        "--slo-ms",
        "150",
        "--rate",
        "100",
        "--share",
        "third=0.25",
    )
    assert done.returncode == 0, done.stderr
    plan: dict[str, Any] = json.loads((tmp_path / "plan.json").read_text())
    assert plan["pipeline"] == "chain" and plan["slo_ms"] == 150
    assert set(plan["models"]) == {"first", "second", "third"}
    assert plan["predicted_p99_ms"] <= 150
    for model in plan["models"].values():
        assert 1 <= model["max_batch_size"] <= 8 and model["replicas"] >= 1
        assert model["resources"] == {"cpus": 1}
        assert 0 < model["utilization"] < 1
        # What the tuner compares live traffic with: the most arrivals each window held.
        assert set(model["planned_peaks"]) == {"0.1", "1", "5", "30"}
    assert (
        plan["models"]["first"]["planned_peaks"]["1"]
        >= plan["models"]["third"]["planned_peaks"]["1"]
    )  # third sees a quarter of the queries
    # Cost counts cores by default: one per replica here.
    assert plan["cost"] == sum(m["replicas"] for m in plan["models"].values())
    assert plan["cost_unit"] == "cores"
    assert "MODEL" in done.stdout and "predicted p99" in done.stdout

    # A trace instead of a rate, a price per core, and no share given: planned as if every
    # query reached the when_unsure step, which the plan says.
    (tmp_path / "trace.txt").write_text("\n".join(str(i * 0.02) for i in range(500)))
    (tmp_path / "cost.json").write_text(json.dumps({"core": 0.5, "unit": "$/h"}))
    traced = ketch_command(
        tmp_path,
        "plan",
        "models.py",
        "chain",
        "--profile",
        "profile.json",
        "--slo-ms",
        "150",
        "--trace",
        "trace.txt",
        "--cost",
        "cost.json",
        "--out",
        "traced.json",
    )
    assert traced.returncode == 0, traced.stderr
    assert "step 3 (third, when unsure) is planned as if every query took it" in traced.stdout
    again = json.loads((tmp_path / "traced.json").read_text())
    assert again["rate"] == 50 and again["arrivals"] == 500
    assert again["cost_unit"] == "$/h"
    assert again["cost"] == 0.5 * sum(m["replicas"] for m in again["models"].values())


def test_what_cannot_be_planned_is_refused_with_the_reason(
    write_models: Callable[[str], Path], tmp_path: Path
) -> None:
    write_models(MODELS)
    profiled(tmp_path)
    base = ["plan", "models.py", "chain", "--profile", "profile.json", "--rate", "50"]
    unreachable = ketch_command(tmp_path, *base, "--slo-ms", "1")
    assert unreachable.returncode == 2
    assert "the objective of 1 ms is out of reach: one query alone takes" in unreachable.stderr
    unknown = ketch_command(
        tmp_path, "plan", "models.py", "nope", "--profile", "profile.json", "--slo-ms", "100",
        "--rate", "5",
    )  # fmt: skip
    assert unknown.returncode == 2
    assert "declares no pipeline 'nope' (its pipelines: ['chain'])" in unknown.stderr
    (tmp_path / "bad.json").write_text("{}")
    bad = ketch_command(
        tmp_path, "plan", "models.py", "chain", "--profile", "bad.json", "--slo-ms", "100",
        "--rate", "5",
    )  # fmt: skip
    assert bad.returncode == 2
    assert "bad.json is not a profile ketch profile wrote" in bad.stderr
    neither = ketch_command(tmp_path, "plan", "models.py", "chain", "--profile", "profile.json",
                            "--slo-ms", "100")  # fmt: skip
    assert neither.returncode == 2
    assert "one of the arguments --rate --trace is required" in neither.stderr


def test_a_plan_is_served_with_its_batch_sizes_replicas_and_threads(
    write_models: Callable[[str], Path],
    tmp_path: Path,
    start_server: Callable[..., KetchServer],
) -> None:
    models = write_models(MODELS)
    plan = {
        "pipeline": "chain",
        "models": {
            "first": {"max_batch_size": 4, "max_delay_ms": 2.0, "replicas": 2,
                      "resources": {"cpus": 1}},
            "third": {"max_batch_size": 8, "max_delay_ms": 0.0, "replicas": 1,
                      "resources": {"cpus": 2}},
        },
    }  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    server = start_server(models, "--plan", str(tmp_path / "plan.json"))
    first = server.model_status("first")
    assert (first["max_batch_size"], first["pool"]["min_replicas"]) == (4, 2)
    assert first["pool"]["max_replicas"] >= 2
    assert first["resources"]["threads"] == 1
    assert server.model_status("third")["resources"]["threads"] == 2
    # The planned replicas are kept warm from the start: two of first, one of third.
    warm = re.compile(r"model (first|third):1 ready: worker pid \d+")
    for _ in range(3 - sum(1 for line in server.seen if warm.search(line))):
        server.wait_for(warm.pattern)
    # A model the plan leaves out keeps its own settings.
    assert server.model_status("second")["pool"]["min_replicas"] == 0
    answer = server.client.post("/apps/chain/predict", json={"input": [1.0, 2.0]})
    assert answer.status_code == 200, answer.text


def test_a_plan_for_models_not_served_stops_the_start(
    write_models: Callable[[str], Path], tmp_path: Path
) -> None:
    models = write_models(MODELS)
    plan = {"models": {"fourth": {"max_batch_size": 4, "max_delay_ms": 0, "replicas": 1,
                                  "resources": {"cpus": 1}}}}  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    server = KetchServer(models, "--plan", str(tmp_path / "plan.json"))
    try:
        assert server.process.wait(60) == 2
        server.wait_for_stderr(r"plans \['fourth'\], which this server does not serve")
    finally:
        server.stop()


TUNED = """
import os

import ketch


@ketch.model(max_replicas=3)
def quick(xs):
    return [os.getpid() for _ in xs]
"""


def test_the_tuner_adds_replicas_when_traffic_exceeds_what_the_plan_was_proven_for(
    write_models: Callable[[str], Path],
    tmp_path: Path,
    start_server: Callable[..., KetchServer],
) -> None:
    models = write_models(TUNED)
    # Planned for at most 2 queries in any second, on one replica.
    plan = {"models": {"quick": {"max_batch_size": 4, "max_delay_ms": 0, "replicas": 1,
                                 "resources": {"cpus": 1}, "planned_peaks": {"1": 2}}}}  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    server = start_server(models, "--plan", str(tmp_path / "plan.json"))
    # One request at a time: the autoscaler alone would keep one worker (its in-flight load
    # never passes one), but 30 in a second is 15 times the plan.
    for _ in range(30):
        assert server.predict("quick", {"inputs": [1]}).status_code == 200
    ready = re.compile(r"model quick:1 ready: worker pid \d+")
    for _ in range(3 - sum(1 for line in server.seen if ready.search(line))):
        server.wait_for(ready.pattern)
    assert server.model_status("quick")["replicas"]["ready"] == 3  # its max_replicas


RENEWED = """
import os
import time

import ketch


@ketch.model(max_batch_size=8, min_replicas=2, max_replicas=2, threads=1, idle_timeout_s=60)
def sized(xs):
    time.sleep(0.005)
    return [
        {"threads": os.environ["OMP_NUM_THREADS"], "pid": os.getpid(), "batch": len(xs)}
        for _ in xs
    ]
"""
PLANNED_SIZED = {"max_batch_size": 4, "max_delay_ms": 3.0, "replicas": 2,
                 "resources": {"cpus": 2}, "planned_peaks": {"1": 50}}  # fmt: skip


def test_a_plan_applied_live_resizes_batches_and_renews_workers_with_no_request_lost(
    write_models: Callable[[str], Path],
    tmp_path: Path,
    start_server: Callable[..., KetchServer],
) -> None:
    server = start_server(write_models(RENEWED), "--admin-token", "plan-token")
    ready = re.compile(r"model sized:1 ready: worker pid (\d+)")
    while len({m.group(1) for line in server.seen if (m := ready.search(line))}) < 2:
        server.wait_for(ready.pattern)
    old_pids = {int(m.group(1)) for line in server.seen if (m := ready.search(line))}
    ten = {"inputs": [1] * 10}
    before = server.predict("sized", ten).json()["outputs"]
    assert {o["threads"] for o in before} == {"1"} and max(o["batch"] for o in before) == 8

    answers: list[int] = []
    stop = threading.Event()

    def keep_asking() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                answers.append(client.post("/models/sized/predict", json=ten).status_code)

    askers = [threading.Thread(target=keep_asking) for _ in range(3)]
    for asker in askers:
        asker.start()
    try:
        (tmp_path / "plan.json").write_text(
            json.dumps({"pipeline": "p", "cost": 2, "models": {"sized": PLANNED_SIZED}})
        )
        applied = ketch_command(
            tmp_path, "models", "plan", "plan.json", "--url", server.url, "--token", "plan-token"
        )
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.strip() == (
            "model sized:1 planned: batches of up to 4, 3 ms delay, 2-2 replicas, 2 threads"
        )
        # Each old worker leaves once idle and a new one (with two threads) is ready.
        renewed = r"model sized:1 lost worker pid (\d+).*: renewed: the model's resources changed"
        gone = {int(server.wait_for(renewed).group(1)) for _ in range(2)}
        assert gone == old_pids
    finally:
        stop.set()
        for asker in askers:
            asker.join(60)
    assert answers and set(answers) == {200}, f"{len(answers)} answers: {set(answers)}"

    after = server.predict("sized", ten).json()["outputs"]
    assert {o["threads"] for o in after} == {"2"}
    assert {o["pid"] for o in after}.isdisjoint(old_pids)
    assert max(o["batch"] for o in after) == 4  # ten inputs in batches of at most four
    status = server.model_status("sized")
    assert status["max_batch_size"] == 4 and status["batching"]["max_delay_ms"] == 3.0
    assert status["resources"]["threads"] == 2 and status["replicas"]["ready"] == 2
    server.wait_for(r"model sized:1 planned: batches of up to 4, 3 ms delay, 2 replicas, "
                    r"2 threads, its workers renewed", seen_too=True)  # fmt: skip

    # A plan that cannot apply changes nothing, and says why.
    token = {"Authorization": "Bearer plan-token"}
    unknown = {"models": {"sized": PLANNED_SIZED, "nope": PLANNED_SIZED}}
    refused = server.client.post("/admin/plan", json=unknown, headers=token)
    assert refused.status_code == 404
    assert "the plan sizes model 'nope', which this server does not serve" in refused.text
    negative = {"models": {"sized": {**PLANNED_SIZED, "replicas": -1}}}
    malformed = server.client.post("/admin/plan", json=negative, headers=token)
    assert malformed.status_code == 400 and "replicas" in malformed.text, malformed.text
    assert server.model_status("sized")["pool"]["min_replicas"] == 2
    assert server.predict("sized", ten).status_code == 200
