"""Prometheus metrics at GET /metrics: a real server's counters, histograms and gauges agree
with the requests sent to it, on ketch's routes and the Open Inference Protocol's; separate
Metrics objects never share a series."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from ketch.observability.metrics import Metrics
from tests.conftest import KetchServer

MODELS = """
    import time

    import ketch

    @ketch.model(cache_size=100, min_replicas=1)
    def cached(xs):
        return [x * 2 for x in xs]

    # Holds the first input up to 2 s for three more: four concurrent requests, one batch.
    @ketch.model(max_batch_size=4, max_delay_ms=2000, min_replicas=1)
    def gathered(xs):
        return [len(xs)] * len(xs)

    @ketch.model(min_replicas=1)
    def broken(xs):
        raise RuntimeError("always")

    # One input computing and one waiting: a third at the same time is answered 429.
    @ketch.model(max_batch_size=1, max_queue=1, min_replicas=1)
    def flooded(xs):
        time.sleep(0.5)
        return xs

    @ketch.model(min_replicas=1)
    def slow(xs):
        time.sleep(1)
        return xs

    # min_replicas=0 (the default): the first request starts its first worker.
    @ketch.model()
    def lazy(xs):
        return xs

    a = ketch.app("a", models=["slow"], slo_ms=300, default_output=-1)
"""

Labels = dict[str, str]


class Scrape:
    """One GET /metrics, parsed; sample values looked up by sample name and labels."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, Labels, float]] = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float | None:
        found = [v for n, ls, v in self.samples if n == name and ls == labels]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None

    def labelsets(self, name: str) -> list[Labels]:
        return [ls for n, ls, _ in self.samples if n == name]


def scrape(server: KetchServer) -> Scrape:
    response = server.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    return Scrape(response.text)


def post_all(server: KetchServer, model: str, bodies: list[Any]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return list(
                await asyncio.gather(
                    *(client.post(f"/models/{model}/predict", json=body) for body in bodies)
                )
            )

    return asyncio.run(run())


def test_metrics_agree_with_the_requests_sent(
    write_models: Callable[[str], Path], start_server: Callable[..., KetchServer]
) -> None:
    server = start_server(write_models(MODELS))
    version = server.model_status("cached")["version"]
    before = scrape(server)
    # Before any request: every model known, healthy, lazy still at zero.
    assert before.value("ketch_model_healthy", model="lazy", version=version) == 1
    assert before.value("ketch_replicas", model="lazy", version=version, state="ready") == 0
    assert before.value("ketch_replicas", model="cached", version=version, state="ready") == 1
    assert before.value("ketch_cold_starts_total", model="lazy", version=version) == 0

    for x in (1, 2, 1, 1):
        assert server.predict("cached", {"input": x}).status_code == 200
    gathered = post_all(server, "gathered", [{"input": i} for i in range(4)])
    assert [r.json()["output"] for r in gathered] == [4] * 4
    assert server.predict("broken", {"input": 1}).status_code == 500
    flooded = [r.status_code for r in post_all(server, "flooded", [{"input": 1}] * 4)]
    assert set(flooded) <= {200, 429} and flooded.count(429) >= 1
    assert server.predict("lazy", {"input": 7}).json()["output"] == 7
    answer = server.client.post("/apps/a/predict", json={"input": 1}).json()
    assert answer["default"] is True and answer["output"] == -1
    assert server.predict("slow", {"input": 1, "timeout_ms": 100}).status_code == 504
    assert server.predict("nonexistent", {"input": 1}).status_code == 404

    m = scrape(server)
    v = version

    # Requests by model, version and status; end-to-end latency for each of them.
    assert m.value("ketch_requests_total", model="cached", version=v, status="200") == 4
    assert m.value("ketch_request_duration_seconds_count", model="cached", version=v) == 4
    assert m.value("ketch_requests_total", model="gathered", version=v, status="200") == 4
    assert m.value("ketch_requests_total", model="broken", version=v, status="500") == 1
    assert m.value("ketch_requests_total", model="flooded", version=v, status="429") == (
        flooded.count(429)
    )
    assert m.value("ketch_requests_total", model="slow", version=v, status="504") == 1
    # A made-up model name is no label value: the series would grow without bound.
    assert m.value("ketch_requests_total", model="", version="", status="404") == 1
    assert all(ls["model"] != "nonexistent" for ls in m.labelsets("ketch_requests_total"))

    # Cache: 1 and 2 missed, 1 hit twice.
    assert m.value("ketch_cache_hits_total", model="cached", version=v) == 2
    assert m.value("ketch_cache_misses_total", model="cached", version=v) == 2
    assert m.value("ketch_cache_hits_total", model="gathered", version=v) is None

    # One batch of four for gathered.
    assert m.value("ketch_batch_size_count", model="gathered", version=v) == 1
    assert m.value("ketch_batch_size_sum", model="gathered", version=v) == 4
    assert m.value("ketch_batch_size_bucket", model="gathered", version=v, le="2.0") == 0
    assert m.value("ketch_batch_size_bucket", model="gathered", version=v, le="4.0") == 1
    # The worker's own compute time, once per batch that came back.
    assert m.value("ketch_model_compute_seconds_count", model="gathered", version=v) == 1
    compute_sum = m.value("ketch_model_compute_seconds_sum", model="slow", version=v)
    assert compute_sum is not None and compute_sum >= 0  # the app's batch may still compute

    # Rejected and expired, as GET /models counts them.
    assert m.value("ketch_rejected_requests_total", model="flooded", version=v) == (
        flooded.count(429)
    )
    expired = m.value("ketch_expired_requests_total", model="slow", version=v)
    assert expired is not None and expired >= 1  # the direct 504, and maybe the app's ask

    # lazy started from zero: one cold start, timed up to its worker's READY.
    assert m.value("ketch_cold_starts_total", model="lazy", version=v) == 1
    assert m.value("ketch_cold_start_duration_seconds_count", model="lazy", version=v) == 1
    assert m.value("ketch_replicas", model="lazy", version=v, state="ready") == 1
    assert m.value("ketch_replicas", model="lazy", version=v, state="starting") == 0
    assert m.value("ketch_cold_starts_total", model="cached", version=v) == 0
    assert m.value("ketch_worker_restarts_total", model="broken", version=v) == 0
    assert m.value("ketch_model_healthy", model="broken", version=v) == 1
    assert m.value("ketch_queue_depth", model="gathered", version=v) == 0

    # The application: one query, answered with its default output.
    assert m.value("ketch_app_requests_total", app="a", status="200") == 1
    assert m.value("ketch_app_default_outputs_total", app="a") == 1


V2_MODELS = """
    import ketch
    from ketch import TensorSpec

    @ketch.model(inputs=[TensorSpec("x", "float64", ())])
    def double(xs):
        return [x * 2 for x in xs]

    @ketch.model(name="double", version=2, inputs=[TensorSpec("x", "float64", ())])
    def double_v2(xs):
        return [x * 2 for x in xs]
"""


def test_open_inference_requests_count_as_model_requests(
    write_models: Callable[[str], Path], start_server: Callable[..., KetchServer]
) -> None:
    server = start_server(write_models(V2_MODELS))

    def infer(path: str, data: list[Any], datatype: str = "FP64") -> int:
        tensor = {"name": "x", "shape": [len(data)], "datatype": datatype, "data": data}
        return server.client.post(path, json={"inputs": [tensor]}).status_code

    assert infer("/v2/models/double/infer", [1.0, 2.0]) == 200  # the highest version, 2
    assert infer("/v2/models/double/infer", [3.0]) == 200
    assert infer("/v2/models/double/versions/1/infer", [1.0]) == 200
    assert infer("/v2/models/double/infer", [1], "INT64") == 400  # x is declared FP64
    assert infer("/v2/models/double/versions/1/infer", ["a"]) == 400  # strings as FP64
    assert infer("/v2/models/double/versions/9/infer", [1.0]) == 404
    assert infer("/v2/models/made-up/infer", [1.0]) == 404
    assert infer("/v2/models/made-up/versions/1/infer", [1.0]) == 404
    # The protocol's other routes are not model requests.
    assert server.client.get("/v2/models/double").status_code == 200
    assert server.client.get("/v2/models/double/ready").status_code == 200

    m = scrape(server)
    # Under the version that answered, whether the path names it or not; a 400 for the
    # request's tensors comes after the version is known, from the path.
    assert m.value("ketch_requests_total", model="double", version="2", status="200") == 2
    assert m.value("ketch_requests_total", model="double", version="1", status="200") == 1
    assert m.value("ketch_requests_total", model="double", version="2", status="400") == 1
    assert m.value("ketch_requests_total", model="double", version="1", status="400") == 1
    assert m.value("ketch_request_duration_seconds_count", model="double", version="2") == 3
    assert m.value("ketch_request_duration_seconds_count", model="double", version="1") == 2
    # An unknown version of a served model: no version label; a made-up model: no labels.
    assert m.value("ketch_requests_total", model="double", version="", status="404") == 1
    assert m.value("ketch_requests_total", model="", version="", status="404") == 2
    assert all(ls["model"] != "made-up" for ls in m.labelsets("ketch_requests_total"))
    counted = [v for n, _, v in m.samples if n == "ketch_requests_total"]
    assert sum(counted) == 8  # the eight infer calls, not the GETs


def test_two_metrics_objects_do_not_share_a_registry() -> None:
    first, second = Metrics(), Metrics()  # the same names twice: no "Duplicated timeseries"
    first.request_done("m", "1", 200, 0.01)
    first.for_model("m", "1").batch_sent(3)
    one, other = Scrape(first.render().decode()), Scrape(second.render().decode())
    assert one.value("ketch_requests_total", model="m", version="1", status="200") == 1
    assert one.value("ketch_batch_size_count", model="m", version="1") == 1
    assert other.value("ketch_requests_total", model="m", version="1", status="200") is None
    assert other.value("ketch_batch_size_count", model="m", version="1") is None


@pytest.mark.parametrize("status", [200, 503])
def test_request_done_labels_status_as_a_string(status: int) -> None:
    metrics = Metrics()
    metrics.request_done("m", "2", status, 0.5)
    scraped = Scrape(metrics.render().decode())
    assert scraped.value("ketch_requests_total", model="m", version="2", status=str(status)) == 1
    assert scraped.value("ketch_request_duration_seconds_sum", model="m", version="2") == 0.5
