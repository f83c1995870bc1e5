"""Applications over HTTP: built-in policies with real workers, feedback, deadlines, defaults,
misbehaving plugins, and policy state kept across a gateway restart."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KetchServer

Start = Callable[..., KetchServer]

MODELS = """
import os
import time

import ketch

calls = 0


@ketch.model(min_replicas=1)
def good(xs):
    return [0.9 for _ in xs]


@ketch.model(min_replicas=1)
def bad(xs):
    return [0.2 for _ in xs]


@ketch.model(min_replicas=1)
def slow(xs):
    time.sleep(3)
    return [0.5 for _ in xs]


@ketch.model(min_replicas=1)
def broken(xs):
    raise ZeroDivisionError("broken on purpose")


@ketch.model(min_replicas=1)
def cheap(xs):
    # A small model that knows how sure it is: the test's input says.
    return [{"label": "cheap", "confidence": x["confidence"]} for x in xs]


@ketch.model(min_replicas=1)
def large(xs):
    # Counts the inputs it computed, so the test can see how many reached it.
    global calls
    calls += len(xs)
    return [{"label": "large", "confidence": 0.99, "calls": calls} for _ in xs]


@ketch.model(name="versioned", version="1", min_replicas=1)
def versioned_v1(xs):
    return ["v1" for _ in xs]


@ketch.model(name="versioned", version="2", min_replicas=1)
def versioned_v2(xs):
    return ["v2" for _ in xs]


one = ketch.app("one", models=["good"])
pinned = ketch.app("pinned", models=["versioned:1", "versioned"], policy="ensemble")
ab = ketch.app("ab", models=["good", "bad"], policy="split",
          params={"weights": {"good": 3, "bad": 1}, "seed": 7})
shadowed = ketch.app("shadowed", models=["good", "bad"], policy="shadow")
ens = ketch.app("ens", models=["good", "bad", "slow"], policy="ensemble", slo_ms=500,
          default_output=0.5)
casc = ketch.app("casc", models=["cheap", "large"], policy="cascade", params={"threshold": 0.8})
thompson = ketch.app("thompson", models=["bad", "good"], policy="thompson", params={"seed": 3})
exp3 = ketch.app("exp3", models=["bad", "good"], policy="exp3", params={"seed": 5})
epsilon_greedy = ketch.app("epsilon_greedy", models=["bad", "good"], policy="epsilon_greedy",
          params={"seed": 9})
exp4 = ketch.app("exp4", models=["bad", "good"], policy="exp4")
late = ketch.app("late", models=["slow"], slo_ms=100, default_output=-1)
late_no_default = ketch.app("late_no_default", models=["slow"], slo_ms=100)
fails = ketch.app("fails", models=["broken"])
fails_over = ketch.app("fails_over", models=["broken", "good"], policy="ensemble")
forgetful = ketch.app("forgetful", models=["good"], query_memory="12KB")
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KetchServer]:
    folder = tmp_path_factory.mktemp("apps")
    path = folder / "apps.py"
    path.write_text(MODELS)
    server = KetchServer(path, "--state-dir", str(folder / "state"))
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def ask(server: KetchServer, app: str, value: Any, **extra: Any) -> dict[str, Any]:
    response = server.client.post(f"/apps/{app}/predict", json={"input": value, **extra})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def tell(server: KetchServer, app: str, query_id: str, **feedback: Any) -> dict[str, Any]:
    response = server.client.post(f"/apps/{app}/feedback", json={"query_id": query_id, **feedback})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def app_status(server: KetchServer, name: str) -> dict[str, Any]:
    for entry in server.client.get("/apps").json()["apps"]:
        if entry["name"] == name:
            return entry  # type: ignore[no-any-return]
    raise AssertionError(f"no application {name} in GET /apps")


def test_single_answers_with_its_model(served: KetchServer) -> None:
    answer = ask(served, "one", 1)
    assert answer["output"] == 0.9
    assert (answer["app"], answer["default"], answer["models"]) == ("one", False, ["good"])
    assert len(answer["query_id"]) == 32 and answer["missing"] == {}


def test_an_application_can_pin_a_model_version(served: KetchServer) -> None:
    answer = ask(served, "pinned", 1)
    assert answer["models"] == ["versioned:1", "versioned"]
    # A tie between v1 and the default version (v2): the application's order decides.
    assert answer["output"] == "v1"


def test_split_routes_by_weight(served: KetchServer) -> None:
    outputs = [ask(served, "ab", i)["output"] for i in range(200)]
    share_good = outputs.count(0.9) / len(outputs)
    assert 0.6 < share_good < 0.9  # weights 3:1
    assert app_status(served, "ab")["policy_state"]["routed"] == {
        "good": outputs.count(0.9),
        "bad": outputs.count(0.2),
    }


def test_shadow_answers_from_the_primary_and_compares_the_mirror(served: KetchServer) -> None:
    for i in range(5):
        answer = ask(served, "shadowed", i)
        assert (answer["output"], answer["models"]) == (0.9, ["good"])
    shadows = app_status(served, "shadowed")["policy_state"]["shadows"]
    # The mirror's answers arrive after the client's; they are compared as they come.
    assert shadows["bad"]["compared"] >= 4
    assert shadows["bad"]["agreed"] == 0
    assert shadows["bad"]["mean_abs_diff"] == pytest.approx(0.7)


def test_ensemble_answers_by_its_deadline_without_the_straggler(served: KetchServer) -> None:
    answer = ask(served, "ens", 1)
    assert answer["output"] == pytest.approx((0.9 + 0.2) / 2)
    assert sorted(answer["models"]) == ["bad", "good"]
    assert answer["default"] is False
    assert answer["missing"] == {"slow": "no answer within 500 ms"}


def test_no_answer_in_time_gives_the_default_output_with_an_explanation(
    served: KetchServer,
) -> None:
    answer = ask(served, "late", 1)
    assert (answer["output"], answer["default"], answer["models"]) == (-1, True, [])
    assert "no model answered within 100 ms" in answer["explanation"]
    assert "slow: no answer within 100 ms" in answer["explanation"]
    assert app_status(served, "late")["defaults"] >= 1


def test_no_answer_and_no_default_is_a_504_naming_the_models(served: KetchServer) -> None:
    response = served.client.post("/apps/late_no_default/predict", json={"input": 1})
    assert response.status_code == 504
    body = response.json()
    assert "has no default_output" in body["error"]
    assert body["missing"] == {"slow": "no answer within 100 ms"}


def test_a_failing_model_is_reported_and_the_others_still_answer(served: KetchServer) -> None:
    response = served.client.post("/apps/fails/predict", json={"input": 1})
    assert response.status_code == 500
    assert "ZeroDivisionError: broken on purpose" in response.json()["missing"]["broken"]
    answer = ask(served, "fails_over", 1)
    assert (answer["output"], answer["models"]) == (0.9, ["good"])
    assert "ZeroDivisionError" in answer["missing"]["broken"]


def test_cascade_asks_the_large_model_only_when_the_cheap_one_is_unsure(
    served: KetchServer,
) -> None:
    sure = [ask(served, "casc", {"confidence": 0.95}) for _ in range(8)]
    assert {a["output"]["label"] for a in sure} == {"cheap"}
    assert all(a["models"] == ["cheap"] for a in sure)
    unsure = [ask(served, "casc", {"confidence": 0.3}) for _ in range(2)]
    assert [a["output"]["label"] for a in unsure] == ["large", "large"]
    # Only the large model's prediction made the answer: a reward alone credits it alone.
    assert unsure[-1]["models"] == ["large"]
    told = tell(served, "casc", unsure[-1]["query_id"], reward=1.0)
    assert told["rewards"] == {"large": 1.0}
    # The large model's own count: it computed the two unsure queries and nothing else.
    assert unsure[-1]["output"]["calls"] == 2
    state = app_status(served, "casc")["policy_state"]
    assert state["escalations"] == 2


@pytest.mark.parametrize("app", ["thompson", "exp3", "epsilon_greedy"])
def test_bandit_learns_to_pick_the_better_model_from_rewards(served: KetchServer, app: str) -> None:
    """1,000 rounds against a simulated environment where 'good' earns a reward 80% of the
    time and 'bad' 40%: the policy must pick 'good' in 80% of the last 200."""
    environment = random.Random(11)
    success = {0.9: 0.8, 0.2: 0.4}
    picked_good = []
    for _ in range(1000):
        answer = ask(served, app, 1)
        picked_good.append(answer["output"] == 0.9)
        reward = 1.0 if environment.random() < success[answer["output"]] else 0.0
        tell(served, app, answer["query_id"], reward=reward)
    assert sum(picked_good[-200:]) >= 160
    assert app_status(served, app)["feedback"] == 1000


def test_exp4_moves_its_ensemble_towards_the_model_the_labels_agree_with(
    served: KetchServer,
) -> None:
    first = ask(served, "exp4", 1)
    assert sorted(first["models"]) == ["bad", "good"]
    assert first["output"] == pytest.approx((0.9 + 0.2) / 2)
    for _ in range(30):
        answer = ask(served, "exp4", 1)
        tell(served, "exp4", answer["query_id"], label=1)
    weights = app_status(served, "exp4")["policy_state"]["weights"]
    assert weights["good"] > 0.9
    assert ask(served, "exp4", 1)["output"] > 0.85


def test_label_feedback_rewards_each_model_by_its_own_prediction(served: KetchServer) -> None:
    answer = ask(served, "ens", 1)
    result = tell(served, "ens", answer["query_id"], label=1)
    assert result["rewards"]["good"] == pytest.approx(0.9)
    assert result["rewards"]["bad"] == pytest.approx(0.2)
    assert result["reward"] == pytest.approx(0.55)


def test_bad_feedback_gets_a_clear_error_and_nothing_is_lost(served: KetchServer) -> None:
    answer = ask(served, "one", 1)
    post = served.client.post
    cases = [
        ({"query_id": "nope", "reward": 1}, 404, "has no query 'nope'"),
        ({"query_id": answer["query_id"]}, 400, "needs a 'reward'"),
        ({"query_id": answer["query_id"], "reward": 2}, 400, "number in [0, 1], got 2"),
        ({"reward": 1}, 400, "needs the 'query_id'"),
    ]
    for body, status, message in cases:
        response = post("/apps/one/feedback", json=body)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
    assert post("/apps/nope/feedback", json={"query_id": "x"}).status_code == 404
    tell(served, "one", answer["query_id"], reward=1)
    again = post("/apps/one/feedback", json={"query_id": answer["query_id"], "reward": 1})
    assert again.status_code == 409
    bad_request = post("/apps/one/predict", json={"inputs": [1]})
    assert bad_request.status_code == 400 and "needs 'input'" in bad_request.json()["error"]
    assert post("/apps/missing/predict", json={"input": 1}).json()["apps"]
    assert ask(served, "one", 2)["output"] == 0.9


def test_past_its_query_memory_an_application_forgets_its_oldest_queries(
    served: KetchServer,
) -> None:
    # Each query keeps its 5,000-character input: 12 KB holds two of them, not three.
    ids = [ask(served, "forgetful", f"{n}" * 5000)["query_id"] for n in range(4)]
    status = app_status(served, "forgetful")
    assert status["query_memory"] == "12KB"
    assert status["queries_held"] == 2
    assert 2 * 5000 < status["query_bytes_held"] <= 12_000
    oldest = served.client.post("/apps/forgetful/feedback", json={"query_id": ids[0], "reward": 1})
    unknown = served.client.post("/apps/forgetful/feedback", json={"query_id": "x", "reward": 1})
    assert oldest.status_code == unknown.status_code == 404
    assert oldest.json().keys() == unknown.json().keys() == {"error", "app"}
    assert oldest.json()["error"].startswith(f"application 'forgetful' has no query {ids[0]!r}")
    assert "latest queries (at most 100000 and 12000 bytes" in oldest.json()["error"]
    assert tell(served, "forgetful", ids[-1], reward=1)["rewards"] == {"good": 1}
    assert app_status(served, "forgetful")["feedback"] == 1


MISBEHAVING = """
import ketch


class Raises(ketch.Policy):
    def select(self, query):
        raise RuntimeError("select exploded")


class UnknownModel(ketch.Policy):
    def select(self, query):
        return ["no_such_model"]


class NotJson(ketch.Policy):
    def combine(self, query, predictions):
        return object()


class BadObserve(ketch.Policy):
    def select(self, query):
        return [self.models[0]]

    def observe(self, query, feedback):
        raise KeyError("observe exploded")


@ketch.hookimpl
def ketch_register_policies(register):
    register("raises", Raises)
    register("unknown_model", UnknownModel)
    register("not_json", NotJson)
    register("bad_observe", BadObserve)
"""

MISBEHAVING_APPS = """
import ketch


@ketch.model(min_replicas=1)
def good(xs):
    return [0.9 for _ in xs]


raises = ketch.app("raises", models=["good"], policy="raises")
unknown_model = ketch.app("unknown_model", models=["good"], policy="unknown_model")
not_json = ketch.app("not_json", models=["good"], policy="not_json")
bad_observe = ketch.app("bad_observe", models=["good"], policy="bad_observe")
fine = ketch.app("fine", models=["good"])
"""


def test_a_misbehaving_policy_plugin_gets_a_clear_500_and_the_gateway_serves_on(
    start_server: Start, tmp_path: Path
) -> None:
    (tmp_path / "misbehaving.py").write_text(MISBEHAVING)
    (tmp_path / "apps.py").write_text(MISBEHAVING_APPS)
    server = start_server(tmp_path / "apps.py", "--plugin", str(tmp_path / "misbehaving.py"))
    post = server.client.post
    expected = {
        "raises": "raised RuntimeError: select exploded in select()",
        "unknown_model": "returned ['no_such_model'], not among the application's models",
        "not_json": "gave an output that is not JSON",
    }
    for app, message in expected.items():
        response = post(f"/apps/{app}/predict", json={"input": 1})
        assert response.status_code == 500, response.text
        body = response.json()
        assert message in body["error"]
        assert (body["policy"], body["plugin"]) == (app, str(tmp_path / "misbehaving.py"))
    answer = ask(server, "bad_observe", 1)
    response = post(
        "/apps/bad_observe/feedback", json={"query_id": answer["query_id"], "reward": 1}
    )
    assert response.status_code == 500
    assert "raised KeyError: 'observe exploded' in observe()" in response.json()["error"]
    assert ask(server, "fine", 1)["output"] == 0.9
    assert server.predict("good", {"input": 1}).json()["output"] == 0.9


def test_policy_state_is_kept_across_a_gateway_restart(start_server: Start, tmp_path: Path) -> None:
    source = tmp_path / "apps.py"
    source.write_text(
        "import ketch\n"
        "@ketch.model(min_replicas=1)\n"
        "def good(xs):\n    return [0.9 for _ in xs]\n"
        "@ketch.model(min_replicas=1)\n"
        "def bad(xs):\n    return [0.2 for _ in xs]\n"
        "learner = ketch.app('learner', models=['good', 'bad'], policy='ucb1')\n"
    )
    state_dir = str(tmp_path / "state")
    first = start_server(source, "--state-dir", state_dir)
    for _ in range(6):
        answer = ask(first, "learner", 1)
        tell(first, "learner", answer["query_id"], reward=1.0 if answer["output"] == 0.9 else 0.0)
    learnt = app_status(first, "learner")["policy_state"]
    assert sum(learnt["pulls"].values()) == 6
    assert first.stop() == 0
    assert (tmp_path / "state" / "apps" / "learner.json").is_file()
    second = start_server(source, "--state-dir", state_dir)
    assert app_status(second, "learner")["policy_state"] == learnt


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        ("a = ketch.app('a', models=['good'], policy='nope')", "no policy named 'nope'"),
        (
            "a = ketch.app('a', models=['missing'])",
            "lists 'missing': Request for unknown model: 'missing' is not found",
        ),
        (
            "a = ketch.app('a', models=['good'], policy='exp3', params={'gama': 1})",
            "policy 'exp3' rejects its models ['good'] or params {'gama': 1}",
        ),
        (
            "a = ketch.app('a', models=['good'], query_memory='lots')",
            "query_memory of application 'a' must be a number of queries >= 1 or a size like "
            "'64MB', got 'lots'",
        ),
    ],
)
def test_an_application_that_cannot_be_served_stops_the_start_with_the_reason(
    tmp_path: Path, declaration: str, message: str
) -> None:
    source = tmp_path / "apps.py"
    source.write_text(f"import ketch\n@ketch.model\ndef good(xs):\n    return xs\n{declaration}\n")
    server = KetchServer(source)
    try:
        assert server.process.wait(60) == 2
        server.wait_for_stderr(re.escape(message))
    finally:
        server.stop()
