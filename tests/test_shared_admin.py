"""Gateways that share one Redis (`--state redis://...`) make every management change any of
them takes: a model or application added, changed or removed at one is served so at all, a
change refused at one is refused at all, and a gateway that starts later serves what the
others serve."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.admin_models import ECHO_V2, SERVED
from tests.conftest import KetchServer
from tests.redis_server import RedisServer

Start = Callable[..., KetchServer]
TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def _shared_keys(monkeypatch: pytest.MonkeyPatch, broker_keys: Path) -> None:
    """Every gateway here uses the keys `ketch keygen` wrote (--broker-keys, by its variable)."""
    monkeypatch.setenv("KETCH_BROKER_KEYS", str(broker_keys))


@pytest.fixture
def start_gateway(
    start_server: Start, write_models: Callable[..., Path], redis_server: RedisServer
) -> Callable[..., KetchServer]:
    write_models(ECHO_V2, "echo_v2.py")
    served = write_models(SERVED)

    def start(*extra: str) -> KetchServer:
        return start_server(served, "--state", redis_server.url, "--admin-token", TOKEN, *extra)

    return start


def admin(server: KetchServer, method: str, path: str, body: Any = None) -> httpx.Response:
    return server.client.request(method, path, json=body, headers=ADMIN)


def echo_v2(tmp_path: Path) -> dict[str, Any]:
    return {
        "name": "echo",
        "runtime": "python",
        "path": f"{tmp_path / 'echo_v2.py'}:echo",
        "version": "2",
        "settings": {"version": "2"},
    }


def answer_of(server: KetchServer, path: str, body: Any) -> Any:
    answer = server.client.post(path, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_model_added_rolled_and_removed_at_one_gateway_is_so_at_the_other(
    start_gateway: Callable[..., KetchServer], tmp_path: Path
) -> None:
    first, second = start_gateway(), start_gateway()
    added = admin(first, "POST", "/admin/models", echo_v2(tmp_path))
    assert added.status_code == 201, added.text
    # The other gateway took the change before the first answered: served there at once.
    assert answer_of(second, "/models/echo/predict", {"inputs": ["x"], "version": "2"})[
        "outputs"
    ] == [["v2", "x"]]
    assert {m["version"] for m in second.client.get("/models").json()["models"]} >= {"1", "2"}

    again = admin(second, "POST", "/admin/models", echo_v2(tmp_path))
    assert again.status_code == 409, again.text
    assert "already served" in again.json()["error"]

    rolled = admin(second, "POST", "/admin/models/echo/roll", {"version": "2"})
    assert rolled.status_code == 200, rolled.text
    for gateway in (first, second):
        assert answer_of(gateway, "/models/echo/predict", {"inputs": ["y"]})["outputs"] == [
            ["v2", "y"]
        ]

    bounds = admin(first, "PATCH", "/admin/models/echo/versions/2/pool", {"max_replicas": 3})
    assert bounds.status_code == 200, bounds.text
    assert second.model_status("echo", "2")["pool"]["max_replicas"] == 3

    removed = admin(first, "DELETE", "/admin/models/echo/versions/1")
    assert removed.status_code == 200, removed.text
    gone = second.client.post("/models/echo/predict", json={"inputs": ["z"], "version": "1"})
    assert gone.status_code == 404, gone.text
    assert answer_of(second, "/models/echo/predict", {"inputs": ["z"]})["outputs"] == [["v2", "z"]]


def test_applications_changed_at_either_gateway_are_served_so_by_both(
    start_gateway: Callable[..., KetchServer],
) -> None:
    first, second = start_gateway(), start_gateway()
    app = {"name": "plus", "models": ["plus_one"], "policy": "split"}
    made = admin(first, "POST", "/admin/apps", app)
    assert made.status_code == 201, made.text
    assert answer_of(second, "/apps/plus/predict", {"input": 1.0})["output"] == 2.0

    linked = admin(second, "POST", "/admin/apps/plus/models", {"model": "plus_two"})
    assert linked.status_code == 200, linked.text
    unlinked = admin(first, "DELETE", "/admin/apps/plus/models/plus_one")
    assert unlinked.status_code == 200, unlinked.text
    for gateway in (first, second):
        assert admin(gateway, "GET", "/admin/apps").json()["apps"][0]["models"] == ["plus_two"]
        assert answer_of(gateway, "/apps/plus/predict", {"input": 1.0})["output"] == 3.0

    # Refused at one, so at the other: nothing left half-changed.
    refused = admin(second, "DELETE", "/admin/apps/plus/models/plus_two")
    assert refused.status_code == 400, refused.text
    assert admin(first, "GET", "/admin/apps").json()["apps"][0]["models"] == ["plus_two"]

    assert admin(second, "DELETE", "/admin/apps/plus").status_code == 200
    assert first.client.post("/apps/plus/predict", json={"input": 1.0}).status_code == 404


def test_a_gateway_that_starts_later_serves_the_changes_made_before_it(
    start_gateway: Callable[..., KetchServer], tmp_path: Path
) -> None:
    first = start_gateway()
    assert admin(first, "POST", "/admin/models", echo_v2(tmp_path)).status_code == 201
    assert admin(first, "POST", "/admin/models/echo/roll", {"version": "2"}).status_code == 200
    made = admin(first, "POST", "/admin/apps", {"name": "plus", "models": ["plus_one"]})
    assert made.status_code == 201, made.text

    later = start_gateway()
    later.wait_for(r"applied 3 management changes the gateways share", seen_too=True)
    assert answer_of(later, "/models/echo/predict", {"inputs": ["x"]})["outputs"] == [["v2", "x"]]
    assert answer_of(later, "/apps/plus/predict", {"input": 1.0})["output"] == 2.0


def test_a_repository_unload_at_one_gateway_unloads_the_model_at_the_other(
    start_gateway: Callable[..., KetchServer],
) -> None:
    first, second = (
        start_gateway("--model-control", "explicit"),
        start_gateway("--model-control", "explicit"),
    )
    unloaded = first.client.post("/v2/repository/models/plus_one/unload")
    assert unloaded.status_code == 200, unloaded.text
    index = second.client.post("/v2/repository/index", json={}).json()
    assert {"name": "plus_one", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in (
        index
    )
    assert second.client.post("/models/plus_one/predict", json={"inputs": [1.0]}).status_code == (
        404
    )
    loaded = second.client.post("/v2/repository/models/plus_one/load")
    assert loaded.status_code == 200, loaded.text
    assert answer_of(first, "/models/plus_one/predict", {"inputs": [1.0]})["outputs"] == [2.0]


def test_a_pipeline_added_and_planned_at_one_gateway_is_served_so_by_the_other(
    start_gateway: Callable[..., KetchServer],
) -> None:
    first, second = start_gateway(), start_gateway()
    body = {"name": "both", "steps": ["plus_one", "plus_two"]}
    made = admin(first, "POST", "/admin/pipelines", body)
    assert made.status_code == 201, made.text
    assert answer_of(second, "/apps/both/predict", {"input": 1.0})["output"] == 4.0
    planned = {"max_batch_size": 3, "max_delay_ms": 2.0, "replicas": 1,
               "resources": {"cpus": 1}, "planned_peaks": {"0.1": 5, "1": 20}}  # fmt: skip
    plan = admin(second, "POST", "/admin/plan", {"models": {"plus_two": planned}})
    assert plan.status_code == 200, plan.text
    at_first = first.model_status("plus_two")
    assert (at_first["max_batch_size"], at_first["pool"]["min_replicas"]) == (3, 1)
    assert at_first["resources"]["threads"] == 1
    assert admin(second, "DELETE", "/admin/apps/both").status_code == 200
    assert first.client.post("/apps/both/predict", json={"input": 1.0}).status_code == 404
