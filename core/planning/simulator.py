"""A discrete-event simulator of a pipeline served by ketch: queries arriving at given moments
go through the pipeline's steps, each model a queue in front of its replicas.

It follows what ketch's queues do (``docs/batching.md``): when a replica is free, it takes what
waits, oldest first, up to the model's batch size, unless ``max_delay`` lets the oldest wait
for a fuller batch; one batch at a time per replica. A batch's time is drawn from the model's
profile at its size: a log-normal with the profile's median and 99th percentile, so the
simulated tails are the measured ones. A parallel step waits for all its models; a
``when_unsure`` step is taken by a query with the step's share (how often it ran, live).
The same seed gives the same draws, so two configurations compare on the same luck.
"""

from __future__ import annotations

import collections
import heapq
import math
import random
from dataclasses import dataclass, field

from ketch.planning.profiles import Option

#: The normal distribution's 99th percentile, in standard deviations.
_Z99 = 2.3263


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """How one model is provisioned: its batch size, replicas, resource option and delay."""

    batch_size: int
    replicas: int
    option: Option
    max_delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class SimStep:
    """A step as the simulator sees it: the models a query is sent to, and how often a query
    takes the step (1 but for a step run only when the one before is unsure)."""

    models: tuple[str, ...]
    share: float = 1.0


@dataclass(slots=True)
class Outcome:
    """What a simulation gave: every query's latency, each model's (its queue and its batch),
    and how busy each model's replicas were."""

    latencies_s: list[float]
    model_latencies_s: dict[str, list[float]]
    utilization: dict[str, float]
    #: When queries reached each model's queue.
    model_arrivals_s: dict[str, list[float]]

    @property
    def p99_s(self) -> float:
        return percentile(self.latencies_s, 99)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (nearest rank), 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass(slots=True)
class _Query:
    arrived: float
    step: int = 0
    outstanding: int = 0


@dataclass(slots=True)
class _Model:
    config: ModelConfig
    queue: collections.deque[tuple[_Query, float]] = field(default_factory=collections.deque)
    idle: int = 0
    busy_s: float = 0.0
    timer_at: float | None = None


def simulate(
    steps: list[SimStep], configs: dict[str, ModelConfig], arrivals: list[float], seed: int = 0
) -> Outcome:
    """The latencies of queries arriving at ``arrivals`` (seconds, sorted) through ``steps``."""
    draws = random.Random(seed)
    models = {name: _Model(config, idle=config.replicas) for name, config in configs.items()}
    events: list[tuple[float, int, str, object]] = []
    order = 0
    latencies: list[float] = []
    model_latencies: dict[str, list[float]] = {name: [] for name in configs}
    model_arrivals: dict[str, list[float]] = {name: [] for name in configs}

    def schedule(at: float, kind: str, payload: object) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (at, order, kind, payload))

    def enter(query: _Query, now: float) -> None:
        while query.step < len(steps):
            step = steps[query.step]
            if step.share >= 1 or draws.random() < step.share:
                query.outstanding = len(step.models)
                for name in step.models:
                    model_arrivals[name].append(now)
                    models[name].queue.append((query, now))
                    dispatch(name, now)
                return
            query.step += 1
        latencies.append(now - query.arrived)

    def dispatch(name: str, now: float) -> None:
        model = models[name]
        config = model.config
        while model.idle and model.queue:
            oldest = model.queue[0][1]
            if len(model.queue) < config.batch_size and now < oldest + config.max_delay_s:
                if model.timer_at is None:
                    model.timer_at = oldest + config.max_delay_s
                    schedule(model.timer_at, "timer", name)
                return
            size = min(len(model.queue), config.batch_size)
            batch = [model.queue.popleft() for _ in range(size)]
            model.idle -= 1
            took = _batch_time(config.option, size, draws)
            model.busy_s += took
            schedule(now + took, "done", (name, batch))

    for arrived in arrivals:
        schedule(arrived, "arrival", _Query(arrived))
    now = 0.0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrival":
            assert isinstance(payload, _Query)
            enter(payload, now)
        elif kind == "timer":
            assert isinstance(payload, str)
            models[payload].timer_at = None
            dispatch(payload, now)
        else:
            assert isinstance(payload, tuple)
            name: str = payload[0]
            batch: list[tuple[_Query, float]] = payload[1]
            models[name].idle += 1
            for query, enqueued in batch:
                model_latencies[name].append(now - enqueued)
                query.outstanding -= 1
                if query.outstanding == 0:
                    query.step += 1
                    enter(query, now)
            dispatch(name, now)
    horizon = max(now - (arrivals[0] if arrivals else 0.0), 1e-9)
    utilization = {
        name: model.busy_s / (model.config.replicas * horizon) for name, model in models.items()
    }
    return Outcome(latencies, model_latencies, utilization, model_arrivals)


def _batch_time(option: Option, size: int, draws: random.Random) -> float:
    """One batch's time: log-normal with the profile's median and 99th percentile."""
    p50, p99 = option.times(size)
    if p50 <= 0:
        return max(p99, 0.0)
    sigma = math.log(max(p99, p50) / p50) / _Z99
    return p50 * math.exp(sigma * draws.gauss(0.0, 1.0)) if sigma > 0 else p50


def poisson_arrivals(rate: float, count: int, seed: int = 0) -> list[float]:
    """``count`` arrival moments of a Poisson process at ``rate`` queries per second."""
    draws = random.Random(seed)
    now, arrivals = 0.0, []
    for _ in range(count):
        now += draws.expovariate(rate)
        arrivals.append(now)
    return arrivals
