"""Prometheus metrics, served at ``GET /metrics`` in the Prometheus text format.

Each server owns one :class:`Metrics` with its own ``CollectorRegistry`` (never the global
default registry), so several servers, or tests, in one process never clash.

Two kinds of metrics:

* What the gateway already keeps (queue depths, replicas, health, and the counts the model
  queues and their caches keep: cold starts, worker exits, cache hits and misses, rejected and
  expired requests, an application's default outputs) is read when Prometheus scrapes, as
  :class:`QueueSample` and :class:`AppSample` rows from the functions given to
  :meth:`Metrics.watch`: nothing is counted twice, and the numbers always agree with
  ``GET /models`` and ``GET /apps``.
* What nothing else keeps (per-status request counts, latency, batch size and cold start
  histograms) is recorded as it happens, through the typed methods of :class:`Metrics` and
  :class:`ModelMetrics`: the gateway's model and application routes report each answer with
  the labels of the route that matched (:mod:`ketch.http.endpoints`).

``docs/metrics.md`` lists every metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

#: Seconds, from a cache hit (well under a millisecond) to a request waiting for a cold start.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: Inputs per batch: powers of two up to the largest ``max_batch_size`` worth telling apart.
BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(10))  # 1, 2, 4, ..., 512
#: Seconds from a request finding its pool at zero to the first worker's READY: a process
#: start and a model load, so from a fraction of a second to minutes for large models.
COLD_START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_MODEL = ("model", "version")


@dataclass(frozen=True, slots=True)
class QueueSample:
    """What one model version's queue shows at scrape time."""

    model: str
    version: str
    queue_depth: int
    ready: int
    starting: int
    healthy: bool
    cold_starts: int
    worker_exits: int
    rejected: int
    expired: int
    #: ``(hits, misses)`` of its prediction cache; None without one.
    cache: tuple[int, int] | None


@dataclass(frozen=True, slots=True)
class AppSample:
    """What one application shows at scrape time."""

    app: str
    default_outputs: int


class ModelMetrics:
    """The histograms of one model version, their label values bound once (the hot path
    then skips a label lookup per batch)."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._batch_size = metrics.batch_size.labels(model, version)
        self._compute = metrics.model_compute.labels(model, version)
        self._cold_start = metrics.cold_start_duration.labels(model, version)

    def batch_sent(self, size: int) -> None:
        self._batch_size.observe(size)

    def batch_computed(self, compute_s: float) -> None:
        """The worker's own time on a batch (as reported in its REPLY)."""
        self._compute.observe(compute_s)

    def cold_start_done(self, seconds: float) -> None:
        self._cold_start.observe(seconds)


class Metrics:
    """One server's metrics: its registry, its histograms and per-status counters, and the
    collector that reads the queues and applications at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._queues: Callable[[], Iterable[QueueSample]] = list
        self._apps: Callable[[], Iterable[AppSample]] = list
        self.requests = Counter(
            "ketch_requests",
            "Requests to /models/{model}/predict and /v2/models/{model}/infer, by the HTTP "
            "status of their answer.",
            [*_MODEL, "status"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "ketch_request_duration_seconds",
            "Time in the gateway from a model request's arrival to its answer.",
            _MODEL,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.app_requests = Counter(
            "ketch_app_requests",
            "Requests to /apps/{app}/predict, by the HTTP status of their answer.",
            ["app", "status"],
            registry=self.registry,
        )
        self.model_compute = Histogram(
            "ketch_model_compute_seconds",
            "The model's compute time on one batch, as its worker measured it.",
            _MODEL,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "ketch_batch_size",
            "Inputs per batch sent to a worker.",
            _MODEL,
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.cold_start_duration = Histogram(
            "ketch_cold_start_duration_seconds",
            "Time from a request finding its pool at zero to the first worker's READY.",
            _MODEL,
            buckets=COLD_START_BUCKETS,
            registry=self.registry,
        )
        self.broker_refused = Counter(
            "ketch_broker_refused",
            "Workers the broker refused: stage=handshake in the CURVE handshake (an unknown "
            "key, no CURVE, a wrong server key), stage=admission at READY (a model not "
            "served, tensors other than the declared ones).",
            ["stage"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(self))
        self._request_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    # -- what is read at scrape time --------------------------------------------------------

    def watch_queues(self, queues: Callable[[], Iterable[QueueSample]]) -> None:
        """Read the model queues through ``queues`` at every scrape."""
        self._queues = queues

    def watch_apps(self, apps: Callable[[], Iterable[AppSample]]) -> None:
        """Read the applications through ``apps`` at every scrape."""
        self._apps = apps

    def queues(self) -> Iterable[QueueSample]:
        return self._queues()

    def apps(self) -> Iterable[AppSample]:
        return self._apps()

    # -- what is recorded as it happens -----------------------------------------------------

    def for_model(self, model: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, model, version)

    def request_done(self, model: str, version: str, status: int, seconds: float) -> None:
        # The labelled children are looked up once per (model, version, status): Prometheus'
        # own lookup costs a lock and a tuple per call, on every request.
        key = (model, version, status)
        bound = self._request_series.get(key)
        if bound is None:
            bound = self._request_series[key] = (
                self.requests.labels(model, version, str(status)),
                self.request_duration.labels(model, version),
            )
        count, duration = bound
        count.inc()
        duration.observe(seconds)

    def app_request_done(self, app: str, status: int) -> None:
        self.app_requests.labels(app, str(status)).inc()

    # -- exposition -------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def endpoint(self, request: Request) -> Response:
        """``GET /metrics``."""
        return Response(self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


class _StateCollector(Collector):
    """Gauges and counters read from the queues and applications when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "ketch_queue_depth", "Inputs waiting for a worker.", labels=_MODEL
        )
        replicas = GaugeMetricFamily(
            "ketch_replicas",
            "Workers of a model version: ready (serving) or starting.",
            labels=[*_MODEL, "state"],
        )
        healthy = GaugeMetricFamily(
            "ketch_model_healthy",
            "1 while the model version is served, 0 once its workers crash-looped.",
            labels=_MODEL,
        )
        cold_starts = CounterMetricFamily(
            "ketch_cold_starts",
            "Requests that found their pool at zero and started its first worker.",
            labels=_MODEL,
        )
        restarts = CounterMetricFamily(
            "ketch_worker_restarts",
            "Unexpected exits of local worker processes; replaced unless they crash-loop.",
            labels=_MODEL,
        )
        hits = CounterMetricFamily(
            "ketch_cache_hits", "Inputs answered from the prediction cache.", labels=_MODEL
        )
        misses = CounterMetricFamily(
            "ketch_cache_misses",
            "Inputs looked up in the prediction cache and not found.",
            labels=_MODEL,
        )
        rejected = CounterMetricFamily(
            "ketch_rejected_requests",
            "Requests answered 429 because the model's queue was full.",
            labels=_MODEL,
        )
        expired = CounterMetricFamily(
            "ketch_expired_requests",
            "Requests answered 504 because their deadline passed.",
            labels=_MODEL,
        )
        for queue in self._metrics.queues():
            labels = [queue.model, queue.version]
            depth.add_metric(labels, queue.queue_depth)
            replicas.add_metric([*labels, "ready"], queue.ready)
            replicas.add_metric([*labels, "starting"], queue.starting)
            healthy.add_metric(labels, 1 if queue.healthy else 0)
            cold_starts.add_metric(labels, queue.cold_starts)
            restarts.add_metric(labels, queue.worker_exits)
            if queue.cache is not None:
                hits.add_metric(labels, queue.cache[0])
                misses.add_metric(labels, queue.cache[1])
            rejected.add_metric(labels, queue.rejected)
            expired.add_metric(labels, queue.expired)
        yield from (depth, replicas, healthy, cold_starts, restarts, hits, misses)
        yield from (rejected, expired)
        defaults = CounterMetricFamily(
            "ketch_app_default_outputs",
            "Application queries answered with the application's default_output.",
            labels=["app"],
        )
        for app in self._metrics.apps():
            defaults.add_metric([app.app], app.default_outputs)
        yield defaults
