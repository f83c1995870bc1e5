"""The planner: a configuration of a pipeline's models that keeps the simulated p99 within the
objective, at the least cost it finds (InferLine's low-frequency planner, SoCC 2020).

It starts feasible (:func:`provision`): every model on its fastest resource option at the
largest batch size it was measured at (ketch's queues send what waits as soon as a replica is
free, so a larger cap only batches what queued), with replicas for its load at 70%
utilization, then a replica more for the busiest model while the simulated p99 misses the
objective. Then it lowers the cost step by step: at each step it simulates every single
change (a replica less; a cheaper resource option; a doubled batch size with a replica less)
and keeps the feasible one that saves the most, until none is feasible. Every simulation sees
the same arrivals and the same draws.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ketch.planning.profiles import ModelProfile, Option
from ketch.planning.simulator import ModelConfig, Outcome, SimStep, simulate

#: The utilization each model starts from: headroom for bursts.
START_UTILIZATION = 0.7
#: Replicas the search adds before it calls the objective out of reach.
MAX_REPLICAS = 256


class PlanError(ValueError):
    """No configuration meets the objective (or the inputs cannot be planned), said so."""


@dataclass(frozen=True, slots=True)
class Plan:
    configs: dict[str, ModelConfig]
    p99_s: float
    cost: float
    outcome: Outcome


def cost_of(configs: dict[str, ModelConfig], core_cost: float) -> float:
    return sum(c.replicas * c.option.cores * core_cost for c in configs.values())


def provision(
    steps: list[SimStep],
    profiles: dict[str, ModelProfile],
    slo_s: float,
    arrivals: list[float],
    batch_size: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, ModelConfig], Outcome]:
    """A configuration whose simulated p99 is within ``slo_s``, and its outcome: each model on
    its fastest resource option, at ``batch_size`` (None: the largest it was measured at),
    with the replicas its load needs at 70% utilization, then one more for the busiest model
    while the objective is missed."""
    names = list(dict.fromkeys(m for step in steps for m in step.models))
    if missing := [n for n in names if n not in profiles]:
        raise PlanError(f"the profile has no measurements of {missing}: run ketch profile first")
    if len(arrivals) < 2:
        raise PlanError("a plan needs at least two arrivals to simulate")
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    share = {n: max(s.share for s in steps if n in s.models) for n in names}
    fastest = {n: min(profiles[n].options, key=lambda o: o.times(1)[0]) for n in names}
    floor_s = sum(max(fastest[m].times(1)[1] for m in step.models) for step in steps)
    if floor_s > slo_s:
        raise PlanError(
            f"the objective of {slo_s * 1000:g} ms is out of reach: one query alone takes "
            f"{floor_s * 1000:.1f} ms at the p99 of its models' fastest batch-1 times"
        )

    def replicas_for(name: str) -> int:
        busy = rate * share[name] * fastest[name].times(1)[0]  # replicas' worth of work
        return max(1, math.ceil(busy / START_UTILIZATION))

    configs = {
        n: ModelConfig(
            batch_size=min(batch_size or fastest[n].max_batch_size, fastest[n].max_batch_size),
            replicas=replicas_for(n),
            option=fastest[n],
        )
        for n in names
    }
    outcome = simulate(steps, configs, arrivals, seed)
    while outcome.p99_s > slo_s:
        busiest = max(names, key=lambda n: outcome.utilization[n])
        if sum(c.replicas for c in configs.values()) >= MAX_REPLICAS:
            raise PlanError(
                f"the objective of {slo_s * 1000:g} ms is out of reach at {rate:.1f} queries/s: "
                f"with {MAX_REPLICAS} replicas the simulated p99 is {outcome.p99_s * 1000:.1f} ms"
            )
        configs[busiest] = dataclasses.replace(
            configs[busiest], replicas=configs[busiest].replicas + 1
        )
        outcome = simulate(steps, configs, arrivals, seed)
    return configs, outcome


def plan(
    steps: list[SimStep],
    profiles: dict[str, ModelProfile],
    slo_s: float,
    arrivals: list[float],
    core_cost: float = 1.0,
    seed: int = 0,
) -> Plan:
    """The cheapest configuration found whose simulated p99 is within ``slo_s``."""
    configs, outcome = provision(steps, profiles, slo_s, arrivals, None, seed)

    def run(configs: dict[str, ModelConfig]) -> Outcome:
        return simulate(steps, configs, arrivals, seed)

    while True:
        best: tuple[float, float, dict[str, ModelConfig], Outcome] | None = None
        current = cost_of(configs, core_cost)
        for candidate in _cheaper(configs, profiles):
            saved = current - cost_of(candidate, core_cost)
            if saved <= 0 or (best is not None and saved < best[0]):
                continue
            tried = run(candidate)
            if tried.p99_s > slo_s:
                continue
            if best is None or saved > best[0] or tried.p99_s < best[1]:
                best = (saved, tried.p99_s, candidate, tried)
        if best is None:
            break
        _, _, configs, outcome = best
    return Plan(configs, outcome.p99_s, cost_of(configs, core_cost), outcome)


def _cheaper(
    configs: dict[str, ModelConfig], profiles: dict[str, ModelProfile]
) -> list[dict[str, ModelConfig]]:
    """Every configuration one change cheaper than ``configs`` (or that makes one possible)."""
    found = []
    for name, config in configs.items():
        changes: list[ModelConfig] = []
        if config.replicas > 1:
            changes.append(dataclasses.replace(config, replicas=config.replicas - 1))
            bigger = min(config.batch_size * 2, config.option.max_batch_size)
            if bigger > config.batch_size:
                changes.append(
                    dataclasses.replace(config, batch_size=bigger, replicas=config.replicas - 1)
                )
        cheaper = _cheaper_option(profiles[name], config.option)
        if cheaper is not None:
            changes.append(
                dataclasses.replace(
                    config,
                    option=cheaper,
                    batch_size=min(config.batch_size, cheaper.max_batch_size),
                )
            )
        found += [{**configs, name: change} for change in changes]
    return found


def _cheaper_option(profile: ModelProfile, option: Option) -> Option | None:
    fewer = [o for o in profile.options if o.cores < option.cores]
    return max(fewer, key=lambda o: o.cores) if fewer else None
