"""Real answers of every route of a running server validate against the OpenAPI document it
serves: the document is generated from the Structs the routes use, and this checks the routes
really answer those shapes (successes and errors alike)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from ketch.deploys.archive import pack
from ketch.deploys.deployer import MANIFEST
from tests.admin_models import ECHO_V2, SERVED
from tests.conftest import KetchServer

TOKEN = "openapi-test-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


PLANNED = {"max_batch_size": 2, "max_delay_ms": 1, "replicas": 1, "resources": {"cpus": 1}}


def _tensor(name: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": "FP64", "data": data}


def _archive(folder: Path) -> bytes:
    """What ``ketch deploy`` sends for a one-model file (no environment to build)."""
    code = folder / "deployed.py"
    code.write_text(
        "import ketch\n\n@ketch.model\ndef tripled(xs):\n    return [3 * x for x in xs]\n"
    )
    manifest = json.dumps({"name": "tripler", "entry": "deployed.py"}).encode()
    packed = pack({"deployed.py": code}, {MANIFEST: manifest}, folder / "deploy.tar.gz")
    return packed.path.read_bytes()


def _requests(folder: Path) -> list[tuple[str, str, Any]]:
    """One or more real requests for every documented operation, in an order that works:
    what is added is changed, then removed."""
    echo_v2 = {
        "name": "echo",
        "runtime": "python",
        "path": f"{folder / 'echo_v2.py'}:echo",
        "version": "2",
        "settings": {"version": "2"},
        "wait": True,
    }
    infer = {"id": "q1", "inputs": [_tensor("input_0", [2], [1.0, 2.0])]}
    return [
        ("GET", "/models", None),
        ("POST", "/models/plus_one/predict", {"input": 1}),
        ("POST", "/models/plus_one/predict", {"inputs": [1, 2]}),
        ("POST", "/models/plus_one/predict", {"inputs": 3}),
        ("POST", "/models/nope/predict", {"input": 1}),
        ("GET", "/v2", None),
        ("GET", "/v2/health/live", None),
        ("GET", "/v2/health/ready", None),
        ("POST", "/v2/repository/index", {}),
        ("POST", "/v2/repository/models/plus_one/load", {}),  # refused: --model-control none
        ("POST", "/v2/repository/models/plus_one/unload", {}),
        ("GET", "/v2/systemsharedmemory/status", None),
        ("GET", "/v2/systemsharedmemory/region/nope/status", None),
        ("POST", "/v2/systemsharedmemory/region/r/register", {"key": "/no-such", "byte_size": 8}),
        ("POST", "/v2/systemsharedmemory/region/r/unregister", None),
        ("POST", "/v2/systemsharedmemory/unregister", None),
        ("GET", "/v2/cudasharedmemory/status", None),
        ("GET", "/v2/cudasharedmemory/region/r/status", None),
        ("POST", "/v2/cudasharedmemory/region/r/register", {"raw_handle": {}, "byte_size": 8}),
        ("POST", "/v2/cudasharedmemory/region/r/unregister", None),
        ("POST", "/v2/cudasharedmemory/unregister", None),
        ("GET", "/v1/models/plus_one", None),
        ("GET", "/v1/models/plus_one/versions/1", None),
        ("POST", "/v1/models/plus_one:predict", {"instances": [1, 2]}),
        ("POST", "/v1/models/plus_one/versions/1:predict", {"inputs": [1]}),
        ("POST", "/v1/models/plus_one:predict", {"instances": []}),
        ("GET", "/v2/models/plus_one", None),
        ("GET", "/v2/models/plus_one/versions/1", None),
        ("GET", "/v2/models/plus_one/ready", None),
        ("GET", "/v2/models/plus_one/versions/1/ready", None),
        ("POST", "/v2/models/plus_one/infer", infer),
        ("POST", "/v2/models/plus_one/versions/1/infer", infer),
        ("GET", "/v2/models/plus_one/config", None),
        ("GET", "/v2/models/plus_one/versions/1/config", None),
        ("GET", "/v2/models/stats", None),
        ("GET", "/v2/models/plus_one/stats", None),
        ("GET", "/v2/models/plus_one/versions/1/stats", None),
        ("GET", "/v2/models/nope/stats", None),
        ("POST", "/v2/models/plus_one/infer", {"inputs": []}),
        ("GET", "/openapi.json", None),
        ("GET", "/admin/models", None),
        ("POST", "/admin/models", echo_v2),
        ("POST", "/admin/models", {"name": "echo", "runtime": "python", "colour": "red"}),
        ("PATCH", "/admin/models/plus_one/pool", {"max_replicas": 2}),
        ("PATCH", "/admin/models/echo/versions/2/pool", {"idle_timeout_s": 30}),
        ("POST", "/admin/models/echo/roll", {"version": "2"}),
        ("POST", "/admin/plan", {"models": {"plus_two": PLANNED}}),
        ("POST", "/admin/plan", {"models": {"nope": PLANNED}}),
        ("POST", "/admin/plan", {"models": {"plus_two": {"max_batch_size": 0}}}),
        ("POST", "/admin/apps", {"name": "pair", "models": ["plus_one"], "policy": "single"}),
        ("POST", "/admin/pipelines", {"name": "pipe2", "steps": ["plus_one", "plus_two"]}),
        ("POST", "/admin/pipelines", {"name": "pipe3", "steps": [{"step": "loop"}]}),
        ("POST", "/apps/pipe/predict", {"input": 1}),
        ("POST", "/apps/pipe/feedback", {"query_id": "unknown", "reward": 1}),
        ("GET", "/apps", None),
        ("GET", "/admin/apps", None),
        ("POST", "/apps/pair/predict", {"input": 1}),
        ("POST", "/apps/pair/feedback", {"query_id": "unknown", "reward": 1}),
        ("POST", "/admin/apps/pair/models", {"model": "plus_two"}),
        ("PATCH", "/admin/apps/pair", {"policy": "ensemble"}),
        ("DELETE", "/admin/apps/pair/models/plus_two", None),
        ("DELETE", "/admin/apps/pair", None),
        ("POST", "/admin/models/echo/roll", {"version": 1}),
        ("DELETE", "/admin/models/echo/versions/2", None),
        ("DELETE", "/admin/models/slow", None),
        ("POST", "/admin/deployments", _archive(folder)),
        ("POST", "/admin/deployments", b"not an archive"),
        ("GET", "/admin/deployments/tripler/versions/1/log?follow=1", None),
        ("GET", "/admin/deployments", None),
        ("GET", "/admin/deployments/tripler", None),
        ("GET", "/admin/deployments/tripler/versions/1", None),
        ("DELETE", "/admin/deployments/tripler/versions/1", None),
        ("DELETE", "/admin/deployments/tripler", None),
        ("GET", "/admin/deployments/tripler/versions/1/log", None),
    ]


def _operation(document: dict[str, Any], method: str, path: str) -> tuple[str, dict[str, Any]]:
    """The documented path template and operation a concrete request matches."""
    path = path.partition("?")[0]
    for template, operations in document["paths"].items():
        pattern = re.sub(r"\{\w+\}", r"[^/]+", template)
        if re.fullmatch(pattern, path) and method.lower() in operations:
            return template, operations[method.lower()]
    raise AssertionError(f"{method} {path} matches no documented operation")


def _validate(document: dict[str, Any], operation: dict[str, Any], answer: httpx.Response) -> None:
    documented = operation["responses"].get(str(answer.status_code))
    assert documented is not None, f"status {answer.status_code} is not documented: {answer.text}"
    if "application/json" not in documented["content"]:
        assert answer.headers["content-type"].startswith("text/plain"), answer.headers
        return
    schema = documented["content"]["application/json"]["schema"]
    # The document is the root, so "#/components/schemas/..." references resolve in it.
    validator = jsonschema.Draft202012Validator({**schema, "components": document["components"]})
    errors = sorted(validator.iter_errors(answer.json()), key=lambda e: list(e.path))
    assert not errors, f"{answer.request.method} {answer.request.url.path}: " + "; ".join(
        f"{list(e.path)}: {e.message}" for e in errors
    )


@pytest.fixture
def server(
    start_server: Callable[..., KetchServer], write_models: Callable[..., Path]
) -> KetchServer:
    write_models(ECHO_V2, "echo_v2.py")
    pipeline = "\npipe = ketch.pipeline('pipe', steps=['plus_one', 'plus_two'])\n"
    return start_server(write_models(SERVED + pipeline), "--admin-token", TOKEN)


def test_every_answer_validates_against_the_served_document(
    server: KetchServer, tmp_path: Path
) -> None:
    document = server.client.get("/openapi.json").json()
    exercised: set[tuple[str, str]] = set()
    statuses: set[int] = set()
    for method, path, body in _requests(tmp_path):
        raw = body if isinstance(body, bytes) else None
        answer = server.client.request(
            method, path, json=None if raw else body, content=raw, headers=ADMIN, timeout=60
        )
        template, operation = _operation(document, method, path)
        _validate(document, operation, answer)
        exercised.add((template, method.lower()))
        statuses.add(answer.status_code)
    documented = {
        (template, method)
        for template, operations in document["paths"].items()
        for method in operations
        if template != "/metrics"  # text, not JSON: tests/test_metrics.py parses it
    }
    assert documented - exercised == set(), "operations this test never asked"
    assert {200, 201, 400, 404} <= statuses, statuses  # successes and errors were both checked
