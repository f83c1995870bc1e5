"""`ketch models ...` and `ketch apps ...` against a real server: what they print, and the
server's state afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.admin_models import ECHO_V2, SERVED
from tests.conftest import KetchServer

TOKEN = "cli-admin-token"


@pytest.fixture
def server(
    start_server: Callable[..., KetchServer],
    write_models: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> KetchServer:
    # From the environment, as operators are advised to give it: the server and the
    # commands below both read KETCH_ADMIN_TOKEN.
    monkeypatch.setenv("KETCH_ADMIN_TOKEN", TOKEN)
    return start_server(write_models(SERVED))


def ketch(server: KetchServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ketch.cli.main", *args, "--url", server.url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def succeeds(server: KetchServer, *args: str) -> str:
    """What ``ketch ARGS`` printed, having exited 0 with nothing on stderr."""
    result = ketch(server, *args)
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout


def fails(server: KetchServer, *args: str) -> str:
    """What ``ketch ARGS`` printed on stderr, having exited 1 (the server refused)."""
    result = ketch(server, *args)
    assert (result.returncode, result.stdout) == (1, ""), result
    return result.stderr


def row(table: str, first_cells: str) -> list[str]:
    """The cells of the table row starting with ``first_cells``."""
    for line in table.splitlines():
        if line.startswith(first_cells + " "):
            return line.split()
    raise AssertionError(f"no row {first_cells!r} in:\n{table}")


def output(server: KetchServer, model: str, body: dict[str, Any]) -> Any:
    answer = server.predict(model, body)
    assert answer.status_code == 200, answer.text
    return answer.json()["output"]


def ask(server: KetchServer, app: str, value: Any) -> Any:
    answer = server.client.post(f"/apps/{app}/predict", json={"input": value})
    assert answer.status_code == 200, answer.text
    return answer.json()["output"]


def test_a_version_is_added_rolled_to_scaled_listed_and_removed(
    server: KetchServer, write_models: Callable[..., Path]
) -> None:
    artifact = f"{write_models(ECHO_V2, 'echo_v2.py')}:echo"
    added = succeeds(
        server,
        *("models", "add", f"echo=python:{artifact}", "--version", "2", "--wait"),
        *("--set", "version=2", "--set", "idle_timeout_s=30"),
    )
    assert added == "model echo:2 added (state ready); requests without a version still go to 1\n"
    assert output(server, "echo", {"input": 5}) == ["v1", 5]
    assert output(server, "echo", {"input": 5, "version": "2"}) == ["v2", 5]
    assert server.model_status("echo", "2")["pool"]["idle_timeout_s"] == 30  # JSON, not "30"

    rolled = succeeds(server, "models", "roll", "echo", "2", "--timeout", "30")
    assert rolled == "model echo: requests without a version go to 2 (was 1)\n"
    assert output(server, "echo", {"input": 6}) == ["v2", 6]

    scaled = succeeds(server, "models", "scale", "echo", "--max", "3", "--idle-timeout", "45")
    assert scaled == (
        "model echo:2 pool: 0-3 replicas, idle timeout 45 s, 64 requests in flight per worker, "
        "cold start timeout 60 s\n"
    )
    pool = server.model_status("echo", "2")["pool"]
    assert (pool["max_replicas"], pool["idle_timeout_s"]) == (3, 45)
    assert server.model_status("echo", "1")["pool"]["max_replicas"] == 1

    listed = succeeds(server, "models", "list")
    assert row(listed, "echo")[:2] == ["echo", "1"]
    assert row(listed, "echo *")[:4] == ["echo", "*", "2", "ready"]
    as_json = json.loads(succeeds(server, "models", "list", "--json"))
    assert [(m["name"], m["version"], m["default"]) for m in as_json["models"]][:2] == [
        ("echo", "1", False),
        ("echo", "2", True),
    ]

    removed = succeeds(server, "models", "remove", "echo", "--version", "1")
    assert removed == "removed echo:1; requests without a version go to 2\n"
    gone = server.predict("echo", {"input": 5, "version": "1"})
    assert gone.status_code == 404
    assert gone.json()["versions"] == ["2"]
    assert output(server, "echo", {"input": 7}) == ["v2", 7]


def test_an_application_is_added_linked_changed_unlinked_and_removed(
    server: KetchServer,
) -> None:
    added = succeeds(server, "apps", "add", "calc", "--model", "plus_one")
    assert added == "app calc added: policy single over plus_one\n"
    assert ask(server, "calc", 1) == 2

    changed = succeeds(server, "apps", "set", "calc", "--policy", "ensemble")
    assert changed == (
        "app calc changed: policy ensemble over plus_one; its policy starts afresh: "
        "the policy changed from 'single' to 'ensemble'\n"
    )
    linked = succeeds(server, "apps", "link", "calc", "plus_two", "--position", "0")
    assert linked == (
        "app calc linked plus_two: policy ensemble over plus_two, plus_one; "
        "its policy keeps what it learnt\n"
    )
    assert ask(server, "calc", 1) == 2.5

    # A JSON object and a plain string; together they replace every param.
    weights = '{"plus_one": 3, "plus_two": 1}'
    succeeds(
        server, "apps", "set", "calc", "--param", f"weights={weights}", "--param", "method=mean"
    )
    assert ask(server, "calc", 1) == 2.25
    (app,) = json.loads(succeeds(server, "apps", "list", "--json"))["apps"]
    assert app["params"] == {"weights": {"plus_one": 3, "plus_two": 1}, "method": "mean"}
    listed = row(succeeds(server, "apps", "list"), "calc")
    assert listed[:4] == ["calc", "ensemble", "plus_two,", "plus_one"]

    # Weights naming plus_two would not fit the application without it: params go first.
    refused = fails(server, "apps", "unlink", "calc", "plus_two")
    assert "weights names models the application does not have: ['plus_two']" in refused
    succeeds(server, "apps", "set", "calc", "--param", "method=mean")
    (app,) = json.loads(succeeds(server, "apps", "list", "--json"))["apps"]
    assert app["params"] == {"method": "mean"}
    unlinked = succeeds(server, "apps", "unlink", "calc", "plus_two")
    assert unlinked.startswith("app calc unlinked plus_two: policy ensemble over plus_one; ")
    assert ask(server, "calc", 1) == 2

    assert succeeds(server, "apps", "remove", "calc") == "app calc removed\n"
    assert server.client.post("/apps/calc/predict", json={"input": 1}).status_code == 404
    assert succeeds(server, "apps", "list") == "no applications\n"


def test_a_wrong_or_missing_token_exits_1_with_the_servers_refusal(server: KetchServer) -> None:
    wrong = fails(server, "models", "remove", "echo", "--token", "wrong")
    assert wrong == "ketch: error: the bearer token is not the admin token (HTTP 401)\n"
    missing = subprocess.run(
        [sys.executable, "-m", "ketch.cli.main", "apps", "list", "--url", server.url],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "KETCH_ADMIN_TOKEN"},
    )
    assert missing.returncode == 1
    assert missing.stderr == (
        "ketch: error: this route needs the admin token as 'Authorization: Bearer <token>' "
        "(HTTP 401)\n"
    )
    assert server.model_status("echo")["version"] == "1"  # not removed


def test_a_refused_change_exits_1_with_the_servers_message(server: KetchServer) -> None:
    assert fails(server, "models", "remove", "nope") == (
        "ketch: error: Request for unknown model: 'nope' is not found (HTTP 404)\n"
    )
    assert fails(server, "models", "roll", "echo", "9") == (
        "ketch: error: model 'echo' has no version '9' (HTTP 404)\n"
    )
    succeeds(server, "apps", "add", "calc", "--model", "plus_one")
    refused = fails(server, "apps", "link", "calc", "plus_two")
    assert refused.startswith("ketch: error: application 'calc': policy 'single' rejects")
    assert "the single policy serves exactly one model" in refused
    assert refused.endswith(" (HTTP 400)\n")
    assert fails(server, "models", "remove", "plus_one") == (
        "ketch: error: model 'plus_one' is linked to applications ['calc']: unlink it from them "
        "(or remove them) first (HTTP 409)\n"
    )
    assert output(server, "plus_one", {"input": 1}) == 2
    (app,) = server.client.get("/apps").json()["apps"]
    assert app["models"] == ["plus_one"]
