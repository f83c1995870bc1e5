"""Batching, deadlines, backpressure, numpy batches and the cache, with real workers."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import KetchServer

Start = Callable[..., KetchServer]
WriteModels = Callable[..., Path]

MODELS = """
    import os
    import time

    import numpy as np

    import ketch

    # Every input answered with the size of the batch it came in.
    @ketch.model(max_batch_size=5, max_delay_ms=2000, min_replicas=1)
    def gathered(xs):
        return [len(xs)] * len(xs)

    # Latency that grows with the batch: 20 ms per call plus 4 ms per input.
    @ketch.model(max_batch_size=64, slo_ms=200, min_replicas=1)
    def growing(xs):
        time.sleep(0.02 + 0.004 * len(xs))
        return [len(xs)] * len(xs)

    # Prints what it computes, so a test can tell what never reached it.
    @ketch.model(max_batch_size=1, min_replicas=1)
    def slow(xs):
        for x in xs:
            print(f"slow: start {x['tag']}", flush=True)
            time.sleep(x["seconds"])
            print(f"slow: done {x['tag']}", flush=True)
        return [x["tag"] for x in xs]

    @ketch.model(max_batch_size=1, max_queue=4, min_replicas=1)
    def flooded(xs):
        time.sleep(0.2)
        return [len(x) for x in xs]

    CALLS = 0

    @ketch.model(cache_size=100, version=1)
    def cached(xs):
        global CALLS
        CALLS += len(xs)
        return [{"calls": CALLS, "version": 1}] * len(xs)

    @ketch.model(cache_size=100, version=2, name="cached")
    def cached_v2(xs):
        return [{"version": 2}] * len(xs)

    @ketch.model(max_batch_size=6, max_delay_ms=2000)
    def stacked(xs: np.ndarray) -> np.ndarray:
        assert isinstance(xs, np.ndarray)
        print(f"stacked: batch of shape {xs.shape} {xs.dtype}", flush=True)
        return xs.sum(axis=tuple(range(1, xs.ndim))) * 2
"""


@pytest.fixture(scope="module")
def models_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("batching") / "models.py"
    path.write_text(textwrap.dedent(MODELS))
    return path


@pytest.fixture
def server(start_server: Start, models_file: Path) -> KetchServer:
    return start_server(models_file)


async def _post_all(
    server: KetchServer, model: str, bodies: list[Any], headers: dict[str, str] | None = None
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(client.post(f"/models/{model}/predict", json=b, headers=headers) for b in bodies)
        )


def post_all(server: KetchServer, model: str, bodies: list[Any]) -> list[httpx.Response]:
    return asyncio.run(_post_all(server, model, bodies))


def test_requests_wait_up_to_max_delay_to_form_one_full_batch(server: KetchServer) -> None:
    responses = post_all(server, "gathered", [{"input": i} for i in range(5)])
    # max_delay_ms=2000 holds the first request until four more fill its batch of 5 (sent
    # as soon as it is full, not after the delay).
    assert [r.json()["output"] for r in responses] == [5] * 5
    responses = post_all(server, "gathered", [{"input": i} for i in range(12)])
    assert sorted(r.json()["output"] for r in responses) == [2] * 2 + [5] * 10
    assert server.model_status("gathered")["batching"]["last_batch_size"] in (2, 5)


def test_batch_size_adapts_to_the_objective(server: KetchServer) -> None:
    async def closed_loop(clients: int, rounds: int) -> list[list[int]]:
        batches: list[list[int]] = []
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:

            async def one_client() -> None:
                for _ in range(rounds):
                    # Four inputs per request keep the queue deep whatever the client's speed;
                    # a deadline of its own: the test is about sizes, not the ramp's 504s.
                    response = await client.post(
                        "/models/growing/predict",
                        json={"inputs": [0, 1, 2, 3], "timeout_ms": 10_000},
                    )
                    assert response.status_code == 200, response.text
                    batches.append(response.json()["outputs"])

            await asyncio.gather(*(one_client() for _ in range(clients)))
        return batches

    sizes = [
        size for outputs in asyncio.run(closed_loop(clients=12, rounds=20)) for size in outputs
    ]
    # slo_ms=200 leaves each batch 100 ms: 20 + 4n ms stays under it up to n = 20. Starting
    # from 1, the limit doubles, is cut back the first time a batch is too slow (32 inputs,
    # 148 ms), and settles below 20, though 48 inputs are always waiting or computing.
    assert sizes[0] == 1
    (worker,) = server.model_status("growing")["workers"]
    assert 5 <= worker["batch_limit"] <= 20  # noise can cut it back now and then
    assert sum(1 for size in sizes if size > 20) <= 32  # the one batch that ends slow start
    assert max(sizes[-400:]) <= 20
    # With the queue never empty, most inputs were computed in batches near the limit.
    assert sum(1 for size in sizes if size >= 8) >= len(sizes) / 2, sizes


def test_deadline_passing_in_the_queue_answers_504_and_never_computes(
    server: KetchServer,
) -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            busy = asyncio.create_task(
                client.post("/models/slow/predict", json={"input": {"tag": "busy", "seconds": 1.5}})
            )
            await asyncio.to_thread(server.wait_for_stderr, r"slow: start busy")
            late = await client.post(
                "/models/slow/predict",
                json={"input": {"tag": "late", "seconds": 0}},
                headers={"X-Ketch-Timeout-Ms": "200"},
            )
            return late, await busy

    late, busy = asyncio.run(scenario())
    assert busy.status_code == 200
    assert late.status_code == 504
    body = late.json()
    assert body["model"] == "slow"
    assert "did not answer within 200 ms" in body["error"]
    assert "never computed" in body["error"]
    # The worker is free again, and it never saw the late request.
    assert server.predict("slow", {"input": {"tag": "after", "seconds": 0}}).status_code == 200
    server.wait_for_stderr(r"slow: done after")
    assert not any("slow: start late" in line for line in server.stderr_lines)
    assert server.model_status("slow")["expired"] == 1


def test_deadline_passing_while_computing_answers_504_before_the_model_finishes(
    server: KetchServer,
) -> None:
    response = server.predict("slow", {"input": {"tag": "long", "seconds": 3}, "timeout_ms": 300})
    assert response.status_code == 504
    assert "while its batch was computing" in response.json()["error"]
    # Answered when the deadline passed: the model has not finished yet.
    assert any("slow: start long" in line for line in server.stderr_lines)
    assert not any("slow: done long" in line for line in server.stderr_lines)
    server.wait_for_stderr(r"slow: done long")
    assert server.predict("slow", {"input": {"tag": "next", "seconds": 0}}).status_code == 200


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        ({"input": 1, "timeout_ms": -5}, {}, "'timeout_ms' must be a number of milliseconds > 0"),
        ({"input": 1, "timeout_ms": "soon"}, {}, "'timeout_ms' must be a number"),
        ({"input": 1}, {"X-Ketch-Timeout-Ms": "soon"}, "X-Ketch-Timeout-Ms header must be"),
    ],
)
def test_bad_timeout_is_a_400_naming_it(
    server: KetchServer, body: dict[str, Any], headers: dict[str, str], message: str
) -> None:
    response = server.client.post("/models/gathered/predict", json=body, headers=headers)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_flood_beyond_max_queue_is_answered_429_and_memory_stays_bounded(
    server: KetchServer,
) -> None:
    gateway = psutil.Process(server.process.pid)
    payload = "x" * 200_000
    waves, per_wave = 4, 200

    def flood() -> list[httpx.Response]:
        return post_all(server, "flooded", [{"input": payload}] * per_wave)

    responses = flood()  # the first wave also grows the allocator's pools to their size
    after_first_mb = gateway.memory_info().rss / 2**20
    for _ in range(waves - 1):
        responses += flood()

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}
    # One computing and max_queue=4 waiting, plus those finished while a wave arrives.
    assert statuses.count(429) >= 0.9 * waves * per_wave
    rejected = next(r for r in responses if r.status_code == 429)
    assert int(rejected.headers["Retry-After"]) >= 1
    assert "max_queue is 4" in rejected.json()["error"]
    assert next(r.json()["output"] for r in responses if r.status_code == 200) == 200_000
    # Queued, the later waves would hold 600 x 200 kB (120 MB, twice over as body and
    # string); rejected, they leave at most the allocator's slack behind.
    grown_mb = gateway.memory_info().rss / 2**20 - after_first_mb
    assert grown_mb < 60, f"the gateway grew by {grown_mb:.0f} MB after the first flood"
    status = server.model_status("flooded")
    assert status["rejected"] == statuses.count(429)
    assert status["queue_depth"] == 0
    # Still serving.
    assert server.predict("flooded", {"input": "abc"}).json()["output"] == 3


def test_cache_answers_repeated_inputs_without_the_worker(server: KetchServer) -> None:
    first = server.predict("cached", {"input": {"a": 1, "b": 2}, "version": "1"}).json()
    again = server.predict("cached", {"input": {"b": 2, "a": 1}, "version": "1"}).json()
    assert first["output"] == again["output"] == {"calls": 1, "version": 1}
    # A batch mixing a cached input and new ones sends only the new ones.
    mixed = server.predict("cached", {"inputs": [{"a": 1, "b": 2}, 7, 8], "version": "1"})
    assert mixed.json()["outputs"] == [
        {"calls": 1, "version": 1},
        {"calls": 3, "version": 1},
        {"calls": 3, "version": 1},
    ]
    cache = server.model_status("cached", "1")["cache"]
    assert (cache["hits"], cache["misses"], cache["entries"]) == (2, 3, 3)
    # Another version has its own cache: never the old version's outputs.
    v2 = server.predict("cached", {"input": {"a": 1, "b": 2}, "version": "2"}).json()
    assert v2["output"] == {"version": 2}
    assert server.model_status("cached", "2")["cache"]["misses"] == 1


def test_numpy_model_gets_one_stacked_array_per_batch(server: KetchServer) -> None:
    bodies = [{"input": [[i, i], [i, i]]} for i in range(6)] + [{"input": [1.5, 2.5, 3]}]
    responses = post_all(server, "stacked", bodies)
    assert [r.status_code for r in responses] == [200] * 7
    assert [r.json()["output"] for r in responses] == [8 * i for i in range(6)] + [14.0]
    # Requests of one shape share a batch; the differently shaped one gets its own.
    server.wait_for_stderr(r"stacked: batch of shape \(6, 2, 2\) int64")
    server.wait_for_stderr(r"stacked: batch of shape \(1, 3\) float64")


def test_numpy_inputs_that_cannot_be_stacked_are_a_400(server: KetchServer) -> None:
    response = server.predict("stacked", {"inputs": [[1, 2], [1, 2, 3]]})
    assert response.status_code == 400
    assert "cannot be stacked into one array" in response.json()["error"]
    assert server.predict("stacked", {"input": [1, 2]}).json()["output"] == 6
