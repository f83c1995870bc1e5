"""What a model version is doing, as ``GET /models`` (and ``ketch status``) show it, and as the
metrics read it at scrape time: :class:`ModelStatus`, built from its queue by :func:`describe`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from msgspec import Meta

from ketch.observability.metrics import QueueSample
from ketch.serving.queue import ModelQueue
from ketch.serving.sequence_queue import SequenceQueue
from ketch.serving.sink import ProcessKey, Worker
from ketch.specs.models import BatchInput, PoolSpec, WorkerStart
from ketch.specs.resources import Resources
from ketch.specs.signature import TensorSpec

#: What a model version can do now: serve (ready), soon (starting), after a cold start (zero),
#: or no more (unhealthy). A model only hand-started workers defined is never at zero: it is
#: removed when its last worker leaves.
QueueState = Literal["ready", "starting", "zero", "unhealthy"]


def state_of(queue: ModelQueue) -> QueueState:
    """What the version can do now (see :data:`QueueState`)."""
    if queue.unhealthy_because is not None:
        return "unhealthy"
    if queue.ready_replicas:
        return "ready"
    if queue.starting:
        return "starting"
    return "unhealthy" if queue.backoff is not None else "zero"


def ready_to_serve(queue: ModelQueue) -> bool:
    """Can answer now, or by a cold start: what readiness probes and ``ketch: ready`` mean.

    A ``preload=True`` model at zero is ready only once its template has loaded: a cold
    start before that pays the whole import the template exists to save."""
    if queue.unhealthy_because is not None:
        return False
    if queue.ready_replicas:
        return True  # crash-looping or not, it serves with them
    if queue.backoff is not None:
        return False
    spec = queue.spec
    if spec.start.preload and (queue.template is None or queue.template["state"] != "ready"):
        return False
    return spec.pool.min_replicas == 0


class Replicas(msgspec.Struct, kw_only=True):
    ready: Annotated[int, Meta(description="Workers that said READY.")]
    starting: Annotated[int, Meta(description="Local processes not ready yet.")]


class Batching(msgspec.Struct, kw_only=True):
    max_delay_ms: float
    slo_ms: float | None
    max_queue: int
    last_batch_size: Annotated[int, Meta(description="Inputs in the last batch sent.")]


class Latency(msgspec.Struct, kw_only=True):
    """Percentiles of the last answered requests' time in the queue (waiting, batching,
    computing), in ms; None before the first answer."""

    requests: int
    p50: float | None
    p90: float | None
    p99: float | None


class CacheStatus(msgspec.Struct, kw_only=True):
    entries: int
    bytes: int | None
    limit: int
    limit_unit: Literal["entries", "bytes"]
    hits: int
    misses: int


class TemplateStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A ``preload=True`` model's template process."""

    pid: int
    state: Literal["loading", "ready"]
    rss_mb: int | None = None


class BackoffStatus(msgspec.Struct, kw_only=True):
    """A crash-looping model's wait before its next worker starts (None when it is not)."""

    reason: str
    quick_exits: Annotated[int, Meta(description="Workers in a row that exited soon after start.")]
    delay_s: Annotated[float, Meta(description="The current wait between attempts (capped).")]
    next_attempt_in_s: Annotated[
        float, Meta(description="Seconds until the next worker may start; 0 once it may.")
    ]


class WorkerStatus(msgspec.Struct, kw_only=True):
    pid: int
    host: str
    capacity: Annotated[int, Meta(description="Batches it takes at once.")]
    batches_in_flight: int
    batch_limit: Annotated[int, Meta(description="Its batch size now (adaptive with slo_ms).")]
    sequences: Annotated[
        int, Meta(description="Active sequences whose state it holds (a sequence model's).")
    ] = 0
    node: Annotated[
        str | None, Meta(description="The Ray node it runs on, when Ray placed it.")
    ] = None


class SequencesStatus(msgspec.Struct, kw_only=True):
    """A sequence model's sequences (None for other models)."""

    active: Annotated[int, Meta(description="Sequences started and not yet ended.")]
    idle_timeout_s: Annotated[float, Meta(description="A sequence idle this long ends.")]


class ModelStatus(msgspec.Struct, kw_only=True):
    """One model version in ``GET /models``."""

    name: str
    version: str
    default: Annotated[bool, Meta(description="Whether requests without a version go here.")]
    state: QueueState
    replicas: Replicas
    runtime: str
    artifact: str | None
    options: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    runtime_info: dict[str, Any]
    max_batch_size: int
    batch_input: BatchInput
    batching: Batching
    latency_ms: Latency
    queue_depth: Annotated[int, Meta(description="Inputs waiting for a worker.")]
    in_flight: Annotated[int, Meta(description="Inputs being computed.")]
    active_requests: int
    rejected: int
    expired: int
    cache: CacheStatus | None
    cold_starts: int
    worker_exits: int
    last_error: str | None
    backoff: BackoffStatus | None
    pool: PoolSpec
    resources: Resources
    start: WorkerStart
    template: TemplateStatus | None
    sequences: SequencesStatus | None
    workers: list[WorkerStatus]


def describe(queue: ModelQueue, default_version: str) -> ModelStatus:
    spec = queue.spec
    slots = queue.worker_slots()
    cache = queue.cache
    template = queue.template
    sequences = queue.sequences if isinstance(queue, SequenceQueue) else None
    return ModelStatus(
        name=spec.name,
        version=spec.version,
        default=spec.version == default_version,
        state=state_of(queue),
        replicas=Replicas(ready=len(slots), starting=len(queue.starting)),
        runtime=spec.runtime,
        artifact=spec.artifact,
        options=spec.options,
        inputs=list(spec.inputs),
        outputs=list(spec.outputs),
        runtime_info=spec.runtime_info,
        max_batch_size=spec.max_batch_size,
        batch_input=spec.batch_input,
        batching=Batching(
            max_delay_ms=spec.max_delay_ms,
            slo_ms=spec.slo_ms,
            max_queue=spec.max_queue,
            last_batch_size=queue.last_batch_size,
        ),
        latency_ms=latency_summary(queue.latencies()),
        queue_depth=queue.queue_depth,
        in_flight=sum(batch.size for slot in slots for batch in slot.batches.values()),
        active_requests=queue.active_requests,
        rejected=queue.rejected,
        expired=queue.expired,
        cache=msgspec.convert(cache.describe(), CacheStatus) if cache is not None else None,
        cold_starts=queue.cold_starts,
        worker_exits=queue.worker_exits,
        last_error=queue.last_error,
        backoff=_backoff(queue),
        pool=spec.pool,
        resources=spec.resources,
        start=spec.start,
        template=msgspec.convert(template, TemplateStatus) if template is not None else None,
        sequences=SequencesStatus(
            active=sequences.active, idle_timeout_s=spec.sequence_idle_timeout_s
        )
        if sequences is not None
        else None,
        workers=[
            WorkerStatus(
                pid=slot.info.pid,
                host=slot.info.host,
                capacity=slot.info.capacity,
                batches_in_flight=len(slot.batches),
                batch_limit=slot.sizer.limit if slot.sizer is not None else spec.batch_limit,
                sequences=sequences.held_by(slot.info.identity) if sequences is not None else 0,
                node=slot.info.node,
            )
            for slot in slots
        ],
    )


def _backoff(queue: ModelQueue) -> BackoffStatus | None:
    backoff = queue.backoff
    if backoff is None:
        return None
    return BackoffStatus(
        reason=backoff.cause,
        quick_exits=backoff.quick_exits,
        delay_s=round(backoff.delay_s, 3),
        next_attempt_in_s=round(max(0.0, backoff.next_attempt_at - time.monotonic()), 3),
    )


def latency_summary(seconds: Sequence[float]) -> Latency:
    if not seconds:
        return Latency(requests=0, p50=None, p90=None, p99=None)
    p50, p90, p99 = (round(float(v), 3) for v in np.percentile(seconds, (50, 90, 99)) * 1000)
    return Latency(requests=len(seconds), p50=p50, p90=p90, p99=p99)


def sample(queue: ModelQueue) -> QueueSample:
    """What the metrics read of a queue at scrape time."""
    cache = queue.cache
    return QueueSample(
        model=queue.spec.name,
        version=queue.spec.version,
        queue_depth=queue.queue_depth,
        ready=queue.ready_replicas,
        starting=len(queue.starting),
        healthy=state_of(queue) != "unhealthy",
        cold_starts=queue.cold_starts,
        worker_exits=queue.worker_exits,
        rejected=queue.rejected,
        expired=queue.expired,
        cache=(cache.hits, cache.misses) if cache is not None else None,
    )


def idle_started_workers(queue: ModelQueue, count: int, started: set[ProcessKey]) -> list[Worker]:
    """Up to ``count`` of ``queue``'s workers that its pool started (``started``: not those
    started by hand) with no batch in flight (nor, for a sequence model, a sequence it holds
    the state of), to scale down."""
    idle = [
        slot.info
        for slot in queue.worker_slots()
        if not slot.batches
        and slot.info.launch in started
        and not queue.holds_state(slot.info.identity)
    ]
    return idle[:count]
