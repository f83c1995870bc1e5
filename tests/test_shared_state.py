"""`ketch serve --state redis://...`: gateways that share applications' state in a real Redis.
A query answered by one gateway takes its feedback at another, feedback given to either teaches
both policies, a new gateway starts from what they learnt, and a Redis that goes away costs
feedback a clear 503 while predictions go on."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import KetchServer
from tests.redis_server import RedisServer

Start = Callable[..., KetchServer]

APPS = """
import ketch


@ketch.model(min_replicas=1)
def good(xs):
    return [0.9 for _ in xs]


@ketch.model(min_replicas=1)
def bad(xs):
    return [0.2 for _ in xs]


learner = ketch.app("learner", models=["good", "bad"], policy="ucb1")
small = ketch.app("small", models=["good"], query_memory=2)
"""


def ask(server: KetchServer, value: Any = 1) -> dict[str, Any]:
    response = server.client.post("/apps/learner/predict", json={"input": value})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def tell(server: KetchServer, answer: dict[str, Any]) -> Any:
    reward = 1.0 if answer["output"] == 0.9 else 0.0
    return server.client.post(
        "/apps/learner/feedback", json={"query_id": answer["query_id"], "reward": reward}
    )


def learner(server: KetchServer) -> dict[str, Any]:
    (entry,) = [a for a in server.client.get("/apps").json()["apps"] if a["name"] == "learner"]
    return entry  # type: ignore[no-any-return]


def test_feedback_at_either_gateway_teaches_both_policies(
    start_server: Start, write_models: Callable[[str], Path], redis_server: RedisServer
) -> None:
    source = write_models(APPS)
    first = start_server(source, "--state", redis_server.url)
    second = start_server(source, "--state", redis_server.url)
    for i in range(8):
        # Answered by one gateway, the feedback given at the other, turn about.
        asked, told = (first, second) if i % 2 else (second, first)
        answered = tell(told, ask(asked))
        assert answered.status_code == 200, answered.text
    one, two = learner(first), learner(second)
    assert one["feedback"] == two["feedback"] == 8
    assert sum(one["policy_state"]["pulls"].values()) == 8
    assert one["policy_state"] == two["policy_state"]
    # Each query is remembered once for the two of them: its one feedback is taken wherever.
    answer = ask(first)
    assert tell(second, answer).status_code == 200
    again = tell(first, answer)
    assert again.status_code == 409, again.text
    assert again.json()["error"] == f"query {answer['query_id']!r} already had its feedback"
    unknown = second.client.post(
        "/apps/learner/feedback", json={"query_id": "never-answered", "reward": 1}
    )
    assert unknown.status_code == 404
    assert "has no query 'never-answered'" in unknown.json()["error"]


def test_the_queries_kept_in_redis_keep_the_applications_bound(
    start_server: Start, write_models: Callable[[str], Path], redis_server: RedisServer
) -> None:
    source = write_models(APPS)
    first = start_server(source, "--state", redis_server.url)
    second = start_server(source, "--state", redis_server.url)
    ids = []
    for server in (first, second, first):
        answer = server.client.post("/apps/small/predict", json={"input": 1})
        ids.append(answer.json()["query_id"])
    held = [a for a in first.client.get("/apps").json()["apps"] if a["name"] == "small"]
    assert held[0]["queries_held"] == 2
    # The oldest of the three (answered by the first gateway) is forgotten by both.
    gone = second.client.post("/apps/small/feedback", json={"query_id": ids[0], "reward": 1})
    assert gone.status_code == 404, gone.text
    for query_id in ids[1:]:
        kept = second.client.post("/apps/small/feedback", json={"query_id": query_id, "reward": 1})
        assert kept.status_code == 200, kept.text


def test_a_gateway_that_starts_later_begins_with_what_the_others_learnt(
    start_server: Start, write_models: Callable[[str], Path], redis_server: RedisServer
) -> None:
    source = write_models(APPS)
    first = start_server(source, "--state", redis_server.url)
    for _ in range(6):
        assert tell(first, ask(first)).status_code == 200
    learnt = learner(first)["policy_state"]
    late = start_server(source, "--state", redis_server.url)
    # From the saved state and the feedback stream after it, whichever the first had written.
    assert learner(late)["policy_state"] == learnt
    assert tell(late, ask(first)).status_code == 200
    assert learner(first)["policy_state"] == learner(late)["policy_state"]
    assert sum(learner(first)["policy_state"]["pulls"].values()) == 7


def test_without_redis_feedback_is_a_503_that_says_so_and_predictions_go_on(
    start_server: Start, write_models: Callable[[str], Path], redis_server: RedisServer
) -> None:
    server = start_server(write_models(APPS), "--state", redis_server.url)
    answer = ask(server)
    redis_server.stop()
    refused = tell(server, answer)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"].startswith(
        "application 'learner' cannot read a query in Redis: "
    )
    assert ask(server)["output"] in (0.9, 0.2)  # still answering, without feedback
    redis_server.start()
    # Back: what was answered meanwhile was not kept, and new queries are kept again.
    assert tell(server, ask(server)).status_code == 200


def ketch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ketch.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_a_state_url_that_is_not_redis_or_not_there_stops_the_start_with_the_reason(
    write_models: Callable[[str], Path], tmp_path: Path
) -> None:
    source = str(write_models(APPS))
    wrong = ketch("serve", source, "--port", "0", "--state", "postgres://x", cwd=tmp_path)
    assert wrong.returncode == 2
    assert "--state takes a Redis URL (redis://HOST:PORT/DB), not 'postgres://x'" in (wrong.stderr)
    away = ketch("serve", source, "--port", "0", "--state", "redis://127.0.0.1:1/0", cwd=tmp_path)
    assert away.returncode == 2
    assert "ketch: error: --state redis://127.0.0.1:1/0: Redis does not answer: " in away.stderr
