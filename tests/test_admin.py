"""The management API (/admin) against real servers: tokens, models added and removed from
runtime artifacts, replica bounds, rolling versions under load, applications changed live."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from ketch.http.openapi import document
from tests.admin_models import ECHO_V2, SERVED
from tests.conftest import KetchServer

TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def server(
    start_server: Callable[..., KetchServer], write_models: Callable[..., Path]
) -> KetchServer:
    write_models(ECHO_V2, "echo_v2.py")
    return start_server(write_models(SERVED), "--admin-token", TOKEN)


def admin(server: KetchServer, method: str, path: str, body: Any = None) -> httpx.Response:
    return server.client.request(method, path, json=body, headers=ADMIN)


def add_echo_v2(server: KetchServer, tmp_path: Path, **extra: Any) -> httpx.Response:
    body = {
        "name": "echo",
        "runtime": "python",
        "path": f"{tmp_path / 'echo_v2.py'}:echo",
        "version": "2",
        "settings": {"version": "2", "idle_timeout_s": 30},
        **extra,
    }
    return admin(server, "POST", "/admin/models", body)


# -- tokens ----------------------------------------------------------------------------------


def _admin_operations() -> Iterator[tuple[str, str]]:
    """Every /admin operation of the OpenAPI document, its path parameters filled in."""
    for path, operations in document()["paths"].items():
        if path.startswith("/admin"):
            concrete = path.replace("{name}", "echo").replace("{version}", "1")
            for method in operations:
                yield method.upper(), concrete.replace("{model}", "echo")


def test_every_admin_route_needs_the_admin_token(server: KetchServer) -> None:
    operations = list(_admin_operations())
    assert len(operations) >= 13
    for method, path in operations:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            answer = server.client.request(method, path, json={}, headers=headers)
            assert answer.status_code == 401, (method, path, headers, answer.text)
            assert answer.headers["www-authenticate"].startswith("Bearer")
            assert "admin token" in answer.json()["error"]
    # Nothing was changed by the refused calls, and prediction routes need no token.
    assert server.predict("echo", {"input": 1}).json()["output"] == ["v1", 1]
    assert admin(server, "GET", "/admin/models").status_code == 200


def test_without_a_token_the_management_api_is_off(
    start_server: Callable[..., KetchServer], write_models: Callable[..., Path]
) -> None:
    server = start_server(write_models(SERVED))
    answer = server.client.get("/admin/models", headers=ADMIN)
    assert answer.status_code == 401
    assert "management API is off" in answer.json()["error"]
    assert "KETCH_ADMIN_TOKEN" in answer.json()["error"]


def test_a_predict_token_guards_every_route_but_probes_and_metrics(
    start_server: Callable[..., KetchServer],
    write_models: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Both from the environment, as operators are advised to pass them.
    monkeypatch.setenv("KETCH_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("KETCH_PREDICT_TOKEN", "predict-token")
    server = start_server(write_models(SERVED))
    body = {"input": 1}
    refused = server.predict("echo", body)
    assert refused.status_code == 401
    assert "predict token" in refused.json()["error"]
    assert server.client.get("/models").status_code == 401
    for token in ("predict-token", TOKEN):
        answer = server.client.post(
            "/models/echo/predict", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert answer.status_code == 200, answer.text
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json"):
        assert server.client.get(path).status_code == 200, path
    # The predict token is not an admin token.
    answer = server.client.get("/admin/models", headers={"Authorization": "Bearer predict-token"})
    assert answer.status_code == 401


# -- models ----------------------------------------------------------------------------------


def test_a_model_added_from_an_artifact_serves_and_goes_away_when_removed(
    server: KetchServer, tmp_path: Path
) -> None:
    answer = add_echo_v2(server, tmp_path, wait=True)
    assert answer.status_code == 201, answer.text
    added = answer.json()["model"]
    assert (added["name"], added["version"], added["state"]) == ("echo", "2", "ready")
    assert added["default"] is False  # a new version takes no traffic until rolled to
    server.wait_for(r"model echo:2 added .*requests without a version still go to 1", seen_too=True)
    assert server.predict("echo", {"input": 5}).json()["output"] == ["v1", 5]
    answer = server.predict("echo", {"input": 5, "version": "2"})
    assert answer.json()["output"] == ["v2", 5]
    (pid,) = [w["pid"] for w in server.model_status("echo", "2")["workers"]]

    again = add_echo_v2(server, tmp_path)
    assert again.status_code == 409
    assert "already served" in again.json()["error"]

    removed = admin(server, "DELETE", "/admin/models/echo/versions/2")
    assert removed.status_code == 200, removed.text
    assert removed.json()["removed"] == ["echo:2"]
    assert removed.json()["default"] == "1"
    server.wait_for(r"model echo:2 removed")
    with contextlib.suppress(psutil.NoSuchProcess):  # already gone before we looked
        psutil.Process(pid).wait(timeout=30)  # its worker is gone
    gone = server.predict("echo", {"input": 5, "version": "2"})
    assert gone.status_code == 404
    assert gone.json()["versions"] == ["1"]
    assert server.predict("echo", {"input": 5}).json()["output"] == ["v1", 5]

    # Added again, it starts afresh.
    assert add_echo_v2(server, tmp_path, wait=True).status_code == 201
    assert server.predict("echo", {"input": 6, "version": "2"}).json()["output"] == ["v2", 6]


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        ({"name": "m", "runtime": "nope", "path": "x"}, 400, "nope"),
        ({"name": "m", "runtime": "python", "path": "/no/such/file.py:f"}, 400, "/no/such/file.py"),
        ({"name": "m", "runtime": "python"}, 400, "FILE_OR_MODULE:name"),
        ({"name": "bad name!", "runtime": "python", "path": "x.py:f"}, 400, "bad name!"),
        ({"runtime": "python", "path": "x.py:f"}, 400, "name"),
        ({"name": "m", "runtime": "python", "path": "x:f", "colour": 1}, 400, "colour"),
        ({"name": "m", "runtime": "python", "path": "x:f", "settings": [1]}, 400, "settings"),
    ],
)
def test_adding_a_bad_model_names_the_problem(
    server: KetchServer, body: dict[str, Any], status: int, names: str
) -> None:
    answer = admin(server, "POST", "/admin/models", body)
    assert answer.status_code == status, answer.text
    assert names in answer.json()["error"]
    assert [m["name"] for m in admin(server, "GET", "/admin/models").json()["models"]] == [
        "echo",
        "plus_one",
        "plus_two",
        "slow",
    ]
    assert server.predict("echo", {"input": 1}).status_code == 200


def test_removing_a_model_lets_its_queued_requests_finish(server: KetchServer) -> None:
    answers: list[httpx.Response] = []
    request = threading.Thread(
        target=lambda: answers.append(server.predict("slow", {"input": 7})), daemon=True
    )
    request.start()
    server.wait_for_stderr("slow is computing")
    removed = admin(server, "DELETE", "/admin/models/slow")
    request.join(30)
    assert removed.status_code == 200, removed.text
    assert removed.json() == {"removed": ["slow:1"], "default": None, "unfinished_requests": 0}
    assert answers[0].status_code == 200
    assert answers[0].json()["output"] == 7
    after = server.predict("slow", {"input": 7})
    assert after.status_code == 404
    assert "Request for unknown model: 'slow' is not found" in after.json()["error"]
    unknown = admin(server, "DELETE", "/admin/models/slow")
    assert unknown.status_code == 404


def test_a_pool_gets_new_replica_bounds(server: KetchServer) -> None:
    answer = admin(server, "PATCH", "/admin/models/plus_one/pool", {"min_replicas": 2})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"]["pool"]["min_replicas"] == 2
    assert answer.json()["model"]["pool"]["max_replicas"] == 2  # raised to hold the floor
    server.wait_for(r"model plus_one:1 pool: 2-2 replicas", seen_too=True)
    for _ in range(2):
        server.wait_for(r"model plus_one:1 ready")
    assert server.model_status("plus_one")["replicas"]["ready"] == 2

    refused = admin(server, "PATCH", "/admin/models/plus_one/versions/1/pool", {"max_replicas": 0})
    assert refused.status_code == 400
    assert "max_replicas" in refused.json()["error"]
    unknown = admin(server, "PATCH", "/admin/models/plus_one/pool", {"replicas": 3})
    assert unknown.status_code == 400
    assert "replicas" in unknown.json()["error"]
    assert server.model_status("plus_one")["pool"]["min_replicas"] == 2

    lower = admin(server, "PATCH", "/admin/models/plus_one/pool", {"min_replicas": 0})
    assert lower.status_code == 200


# -- rolling versions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    sent: float
    status: int
    version: str | None
    output: Any


class Load:
    """Clients sending requests without a version, back to back, until stopped."""

    def __init__(self, server: KetchServer, clients: int = 4) -> None:
        self._url = server.url
        self._stop = threading.Event()
        self.answers: list[Answer] = []
        #: Notified at each answer, for :meth:`wait_for_answers`.
        self._answered = threading.Condition()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self) -> None:
        with httpx.Client(base_url=self._url, timeout=30) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                sent = time.monotonic()
                try:
                    response = client.post("/models/echo/predict", json={"input": n})
                    body = response.json()
                    answer = Answer(sent, response.status_code, body.get("version"), body)
                except httpx.HTTPError as exc:
                    answer = Answer(sent, 0, None, repr(exc))
                with self._answered:
                    self.answers.append(answer)
                    self._answered.notify_all()

    def wait_for_answers(self, version: str, count: int, after: float) -> None:
        """Until ``count`` answers from ``version`` to requests sent after ``after``."""

        def enough() -> bool:
            done = sum(1 for a in self.answers if a.sent > after and a.version == version)
            return done >= count

        with self._answered:
            if not self._answered.wait_for(enough, timeout=60):
                pytest.fail(f"fewer than {count} answers from version {version} within 60 s")


def test_rolling_forward_and_back_under_load_fails_no_request(
    server: KetchServer, tmp_path: Path
) -> None:
    assert add_echo_v2(server, tmp_path).status_code == 201  # at zero: the roll starts it
    with Load(server) as load:
        load.wait_for_answers("1", 20, after=0)

        forward = admin(server, "POST", "/admin/models/echo/roll", {"version": "2"})
        assert forward.status_code == 200, forward.text
        assert forward.json() == {"model": "echo", "default": "2", "previous": "1"}
        rolled_forward = time.monotonic()
        load.wait_for_answers("2", 50, after=rolled_forward)
        # Without traffic, version 1 scales to zero: rolling back must start it first.
        server.wait_for(r"model echo:1 scaled to zero")

        rolling_back = time.monotonic()
        back = admin(server, "POST", "/admin/models/echo/roll", {"version": 1})
        assert back.status_code == 200, back.text
        assert back.json() == {"model": "echo", "default": "1", "previous": "2"}
        rolled_back = time.monotonic()
        load.wait_for_answers("1", 50, after=rolled_back)

    failed = [a for a in load.answers if a.status != 200]
    assert failed == [], f"{len(failed)} of {len(load.answers)} requests failed: {failed[:3]}"
    for answer in load.answers:
        assert answer.output["output"][0] == f"v{answer.version}"
        if rolled_forward < answer.sent < rolling_back:
            assert answer.version == "2", answer
        elif answer.sent > rolled_back:
            assert answer.version == "1", answer
    server.wait_for(r"model echo: requests without a version go to 2 \(was 1\)", seen_too=True)
    server.wait_for(r"model echo: requests without a version go to 1 \(was 2\)", seen_too=True)
    # The version with the traffic cannot be removed while another could take it.
    refused = admin(server, "DELETE", "/admin/models/echo/versions/1")
    assert refused.status_code == 409
    assert "roll to another version first" in refused.json()["error"]
    assert admin(server, "DELETE", "/admin/models/echo/versions/2").status_code == 200


def test_rolling_to_an_unknown_or_broken_version_leaves_the_default(
    server: KetchServer, tmp_path: Path, write_models: Callable[..., Path]
) -> None:
    unknown = admin(server, "POST", "/admin/models/echo/roll", {"version": "9"})
    assert unknown.status_code == 404
    assert unknown.json()["versions"] == ["1"]
    write_models("import ketch\nraise RuntimeError('cannot load')\n", "broken.py")
    body = {
        "name": "echo",
        "runtime": "python",
        "path": f"{tmp_path / 'broken.py'}:echo",
        "version": "3",
        "settings": {"cold_start_timeout_s": 30},
    }
    assert admin(server, "POST", "/admin/models", body).status_code == 201
    broken = admin(server, "POST", "/admin/models/echo/roll", {"version": "3"})
    assert broken.status_code == 503
    assert "echo:3" in broken.json()["error"]
    assert server.predict("echo", {"input": 2}).json()["output"] == ["v1", 2]
    assert server.model_status("echo", "1")["default"] is True


# -- applications ----------------------------------------------------------------------------


def ask(server: KetchServer, app: str, value: Any) -> dict[str, Any]:
    answer = server.client.post(f"/apps/{app}/predict", json={"input": value})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_applications_are_added_linked_changed_and_removed_live(server: KetchServer) -> None:
    spec = {"name": "calc", "models": ["plus_one"], "policy": "single"}
    answer = admin(server, "POST", "/admin/apps", spec)
    assert answer.status_code == 201, answer.text
    assert ask(server, "calc", 1)["output"] == 2
    assert admin(server, "POST", "/admin/apps", spec).status_code == 409

    # A single policy cannot take two models: refused, and the application is unchanged.
    refused = admin(server, "POST", "/admin/apps/calc/models", {"model": "plus_two"})
    assert refused.status_code == 400
    assert "single policy serves exactly one model" in refused.json()["error"]
    assert ask(server, "calc", 1)["output"] == 2

    changed = admin(
        server,
        "PATCH",
        "/admin/apps/calc",
        {"policy": "ensemble", "models": ["plus_one", "plus_two"], "params": {"method": "mean"}},
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["state"] == "reset"
    assert changed.json()["reset_because"].startswith("the policy changed")
    answer_body = ask(server, "calc", 1)
    assert answer_body["output"] == 2.5
    assert sorted(answer_body["models"]) == ["plus_one", "plus_two"]

    unlinked = admin(server, "DELETE", "/admin/apps/calc/models/plus_one")
    assert unlinked.status_code == 200, unlinked.text
    assert ask(server, "calc", 1)["output"] == 3
    only = admin(server, "DELETE", "/admin/apps/calc/models/plus_two")
    assert only.status_code == 400
    assert "only model" in only.json()["error"]
    missing = admin(server, "DELETE", "/admin/apps/calc/models/echo")
    assert missing.status_code == 404

    unknown_policy = admin(server, "PATCH", "/admin/apps/calc", {"policy": "nope"})
    assert unknown_policy.status_code == 400
    assert "nope" in unknown_policy.json()["error"]
    far = admin(server, "POST", "/admin/apps/calc/models", {"model": "echo", "position": 5})
    assert far.status_code == 400
    assert "'position' must be 0-1" in far.json()["error"]
    unknown_model = admin(server, "POST", "/admin/apps/calc/models", {"model": "ghost"})
    assert unknown_model.status_code == 400
    assert "ghost" in unknown_model.json()["error"]
    assert ask(server, "calc", 1)["output"] == 3

    # A model an application links cannot be removed until it is unlinked.
    linked = admin(server, "DELETE", "/admin/models/plus_two")
    assert linked.status_code == 409
    assert linked.json()["apps"] == ["calc"]

    assert admin(server, "DELETE", "/admin/apps/calc").status_code == 200
    gone = server.client.post("/apps/calc/predict", json={"input": 1})
    assert gone.status_code == 404
    assert admin(server, "DELETE", "/admin/models/plus_two").status_code == 200
    server.wait_for(r"app calc removed", seen_too=True)


def test_a_bandit_keeps_what_it_learnt_when_models_are_linked(server: KetchServer) -> None:
    spec = {"name": "bandit", "models": ["plus_one", "plus_two"], "policy": "thompson"}
    assert admin(server, "POST", "/admin/apps", spec).status_code == 201
    for _ in range(20):
        answer = ask(server, "bandit", 1)
        reward = 1.0 if answer["models"] == ["plus_two"] else 0.0
        feedback = {"query_id": answer["query_id"], "reward": reward}
        assert server.client.post("/apps/bandit/feedback", json=feedback).status_code == 200
    last = ask(server, "bandit", 1)
    learnt = admin(server, "GET", "/admin/apps").json()["apps"][0]["policy_state"]

    linked = admin(server, "POST", "/admin/apps/bandit/models", {"model": "echo", "position": 0})
    assert linked.status_code == 200, linked.text
    assert linked.json()["state"] == "kept"
    app = linked.json()["app"]
    assert app["models"] == ["echo", "plus_one", "plus_two"]
    for key in ("successes", "failures"):
        kept = app["policy_state"][key]
        assert {m: kept[m] for m in ("plus_one", "plus_two")} == learnt[key]
        assert kept["echo"] == 0

    # Feedback for a query answered before a model was unlinked still teaches the policy.
    assert (
        admin(server, "DELETE", f"/admin/apps/bandit/models/{last['models'][0]}").status_code == 200
    )
    feedback = {"query_id": last["query_id"], "reward": 1.0}
    answer = server.client.post("/apps/bandit/feedback", json=feedback)
    assert answer.status_code == 200, answer.text

    # Removed and added back with the same policy and models, it resumes from its saved state.
    before = admin(server, "GET", "/admin/apps").json()["apps"][0]
    assert admin(server, "DELETE", "/admin/apps/bandit").status_code == 200
    again = {"name": "bandit", "models": before["models"], "policy": "thompson"}
    restored = admin(server, "POST", "/admin/apps", again)
    assert restored.status_code == 201
    assert restored.json()["app"]["policy_state"] == before["policy_state"]


def test_what_a_changed_application_learnt_survives_a_restart(
    start_server: Callable[..., KetchServer], write_models: Callable[..., Path], tmp_path: Path
) -> None:
    source = write_models(
        SERVED
        + '\nlearner = ketch.app("learner", models=["plus_one", "plus_two"], policy="thompson")\n'
    )
    state_dir = str(tmp_path / "state")
    first = start_server(source, "--admin-token", TOKEN, "--state-dir", state_dir)
    linked = admin(first, "POST", "/admin/apps/learner/models", {"model": "echo"})
    assert linked.status_code == 200, linked.text
    for _ in range(10):
        answer = ask(first, "learner", 1)
        feedback = {"query_id": answer["query_id"], "reward": 1.0}
        assert first.client.post("/apps/learner/feedback", json=feedback).status_code == 200
    learnt = admin(first, "GET", "/admin/apps").json()["apps"][0]["policy_state"]
    assert sum(learnt["successes"].values()) == 10
    first.stop()

    # The served file lists two models, the state was learnt with three: the policy keeps
    # what it knows of the two.
    second = start_server(source, "--admin-token", TOKEN, "--state-dir", state_dir)
    restored = admin(second, "GET", "/admin/apps").json()["apps"][0]["policy_state"]
    for key in ("successes", "failures"):
        assert restored[key] == {m: learnt[key][m] for m in ("plus_one", "plus_two")}
