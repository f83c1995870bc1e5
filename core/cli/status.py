"""``ketch status``: what a running server is doing, as tables, from ``GET /models`` and
``GET /apps``; ``ketch models list`` and ``ketch apps list`` print the same tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ketch.cli.http_client import request_json


def model_rows(models: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = [
        [
            "MODEL",
            "VERSION",
            "STATE",
            "READY",
            "STARTING",
            "QUEUED",
            "IN FLIGHT",
            "COLD STARTS",
            "RESTARTS",
            "LAST BATCH",
            "P50 MS",
            "P99 MS",
        ]
    ]
    for m in models:
        replicas = m.get("replicas") or {}
        batching = m.get("batching") or {}
        latency = m.get("latency_ms") or {}
        rows.append(
            [
                m["name"] + (" *" if m.get("default") else ""),
                str(m["version"]),
                str(m.get("state", "?")),
                _cell(replicas.get("ready")),
                _cell(replicas.get("starting")),
                _cell(m.get("queue_depth")),
                _cell(m.get("in_flight")),
                _cell(m.get("cold_starts")),
                # Unexpected worker exits: each one is a worker the pool starts again.
                _cell(m.get("worker_exits")),
                _cell(batching.get("last_batch_size")),
                # Of the model's last answered requests, queueing and batching included.
                _cell(latency.get("p50")),
                _cell(latency.get("p99")),
            ]
        )
    return rows


def app_rows(apps: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = [["APP", "POLICY", "MODELS", "QUERIES", "DEFAULTS", "ERRORS", "FEEDBACK"]]
    for a in apps:
        pipeline = a.get("kind") == "pipeline"
        rows.append(
            [
                str(a["name"]),
                "(pipeline)" if pipeline else str(a.get("policy", "?")),
                " -> ".join(_step_models(a.get("steps", [])))
                if pipeline
                else ", ".join(a.get("models", [])),
                _cell(a.get("queries")),
                _cell(a.get("defaults")),
                _cell(a.get("errors")),
                _cell(a.get("feedback")),
            ]
        )
    return rows


def _step_models(steps: Sequence[dict[str, Any]]) -> list[str]:
    """Each step of a pipeline as its model(s): ``a``, ``a + b`` (parallel), ``a?`` (when
    the step before is unsure)."""
    shown = []
    for step in steps:
        if step.get("step") == "parallel":
            shown.append(" + ".join(step.get("models", [])))
        else:
            shown.append(
                str(step.get("model")) + ("?" if step.get("step") == "when_unsure" else "")
            )
    return shown


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def models_table(models: Sequence[dict[str, Any]]) -> str:
    if not models:
        return "no models"
    return table(model_rows(models)) + "\n(* the version requests without one get)"


def apps_table(apps: Sequence[dict[str, Any]]) -> str:
    return table(app_rows(apps)) if apps else "no applications"


def print_status(url: str, token: str | None) -> int:
    """Print the tables; ``token`` is for a server with a predict token, which guards
    ``GET /models`` and ``GET /apps``."""
    models = request_json(url, "GET", "/models", token=token).get("models", [])
    apps = request_json(url, "GET", "/apps", token=token).get("apps", [])
    print(f"ketch at {url}")
    print()
    print(models_table(models))
    print()
    print(apps_table(apps))
    return 0


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)
