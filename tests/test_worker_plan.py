"""Unit tests for ``ketch.worker.plan``: what a worker is told, as it crosses into its process."""

from __future__ import annotations

import json

from ketch.worker.plan import WorkerPlan


def test_a_plan_round_trips_through_json_with_the_gateways_plugins() -> None:
    plan = WorkerPlan(
        "app.py:double",
        "2",
        "tcp://127.0.0.1:7070",
        resources={"threads": 1},
        plugins=("/srv/plugins/table.py", "pkg.policies"),
        autoload=False,
    )
    again = WorkerPlan.from_json(plan.to_json())
    assert again == plan
    assert again.plugins == ("/srv/plugins/table.py", "pkg.policies")
    assert again.autoload is False


def test_a_plan_from_a_newer_gateway_keeps_what_it_knows() -> None:
    data = json.loads(WorkerPlan("app.py", None, "tcp://127.0.0.1:7070").to_json())
    data["from_the_future"] = True
    assert WorkerPlan.from_dict(data) == WorkerPlan("app.py", None, "tcp://127.0.0.1:7070")
