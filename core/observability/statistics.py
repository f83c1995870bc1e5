"""Each model version's inference statistics, as Triton's statistics extension reports them:
counts and summed durations of successful and failed requests, of their time in the queue and
of the model's compute, per batch size too. Plain counters the model queue adds to as requests
and batches pass (a few integer additions each), read by ``GET /v2/models/stats`` and gRPC's
``ModelStatistics``."""

from __future__ import annotations

import time

import msgspec

_NS = 1_000_000_000


class StatisticDuration(msgspec.Struct, kw_only=True):
    count: int
    ns: int


class InferStatistics(msgspec.Struct, kw_only=True):
    success: StatisticDuration
    fail: StatisticDuration
    queue: StatisticDuration
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration
    cache_hit: StatisticDuration
    cache_miss: StatisticDuration


class BatchStatistics(msgspec.Struct, kw_only=True):
    batch_size: int
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration


class ModelStats(msgspec.Struct, kw_only=True):
    """Triton's ``ModelStatistics`` of one model version."""

    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    inference_stats: InferStatistics
    batch_stats: list[BatchStatistics]


class Duration:
    """How many times something happened, and their durations summed, in nanoseconds."""

    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * _NS)

    def snapshot(self) -> StatisticDuration:
        return StatisticDuration(count=self.count, ns=self.ns)


class ModelStatistics:
    """One model version's statistics (see the module's docstring).

    ``inference_count`` counts the items (batch rows) of successful requests, as Triton does;
    ``execution_count`` the batches the workers computed. Compute is the model's time on a
    batch as the worker measured it; ketch's workers take tensors as the gateway sends them,
    so there is no separate input or output step to time (both stay 0).
    """

    __slots__ = (
        "batches",
        "cache_hit",
        "cache_miss",
        "compute",
        "execution_count",
        "fail",
        "inference_count",
        "last_inference_ms",
        "queue",
        "success",
    )

    def __init__(self) -> None:
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute = Duration()
        self.cache_hit = Duration()
        self.cache_miss = Duration()
        self.inference_count = 0
        self.execution_count = 0
        #: Wall-clock milliseconds of the last request answered, 0 before any.
        self.last_inference_ms = 0
        #: The batches computed by size.
        self.batches: dict[int, Duration] = {}

    def request_done(self, ok: bool, items: int, seconds: float) -> None:
        if ok:
            self.success.add(seconds)
            self.inference_count += items
        else:
            self.fail.add(seconds)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def queued(self, seconds: float) -> None:
        """A request's first batch left for a worker ``seconds`` after it arrived."""
        self.queue.add(seconds)

    def batch_computed(self, size: int, seconds: float) -> None:
        self.execution_count += 1
        self.compute.add(seconds)
        by_size = self.batches.get(size)
        if by_size is None:
            by_size = self.batches[size] = Duration()
        by_size.add(seconds)

    def snapshot(self, name: str, version: str) -> ModelStats:
        """Triton's ``ModelStatistics`` of now (the shape gRPC's message is parsed from)."""
        zero = StatisticDuration(count=0, ns=0)
        return ModelStats(
            name=name,
            version=version,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=InferStatistics(
                success=self.success.snapshot(),
                fail=self.fail.snapshot(),
                queue=self.queue.snapshot(),
                compute_input=zero,
                compute_infer=self.compute.snapshot(),
                compute_output=zero,
                cache_hit=self.cache_hit.snapshot(),
                cache_miss=self.cache_miss.snapshot(),
            ),
            batch_stats=[
                BatchStatistics(
                    batch_size=size,
                    compute_input=StatisticDuration(count=d.count, ns=0),
                    compute_infer=d.snapshot(),
                    compute_output=StatisticDuration(count=d.count, ns=0),
                )
                for size, d in sorted(self.batches.items())
            ],
        )
