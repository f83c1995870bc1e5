"""A plan applied to the models a server serves (``ketch serve --plan plan.json``).

Each model the plan names is served with the plan's batch size and delay, and its pool keeps
the plan's replicas warm (``min_replicas``; ``max_replicas`` is raised to them if it was
lower, so the pool can still grow past them under a burst), each worker with the plan's cores
as its math libraries' threads, and its tuner (:mod:`ketch.planning.tuner`) scales it from
the arrivals the plan was proven for (``planned_peaks``). Every version of a named model
takes the plan. A plan that
names a model the server does not serve, or that is not a plan ``ketch plan`` wrote, stops
the start with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec

from ketch.errors import TargetLoadError
from ketch.planning.tuner import Tuner
from ketch.specs.models import ModelSpec


@dataclass(frozen=True, slots=True)
class AppliedPlan:
    """The served models with the plan applied, and a tuner for each planned version."""

    specs: list[ModelSpec]
    tuners: dict[tuple[str, str], Tuner]


class PlannedResources(msgspec.Struct):
    cpus: int


class PlannedModel(msgspec.Struct):
    """One model of ``plan.json``, as ``ketch plan`` writes it (other keys are ignored)."""

    max_batch_size: int
    max_delay_ms: float
    replicas: int
    resources: PlannedResources
    planned_peaks: dict[float, int] = msgspec.field(default_factory=dict)


class _PlanFile(msgspec.Struct):
    models: dict[str, PlannedModel]


def read_plan(path: Path) -> dict[str, PlannedModel]:
    """The plan's models; raises :class:`TargetLoadError`."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=_PlanFile).models
    except (OSError, msgspec.DecodeError) as exc:
        raise TargetLoadError(f"--plan {path} is not a plan ketch plan wrote: {exc}") from None


def apply_plan(specs: list[ModelSpec], path: Path) -> AppliedPlan:
    """``specs`` with the plan at ``path`` applied to the models it names."""
    planned = read_plan(path)
    served = {spec.name for spec in specs}
    if unknown := sorted(set(planned) - served):
        raise TargetLoadError(
            f"--plan {path} plans {unknown}, which this server does not serve ({sorted(served)})"
        )
    applied = []
    tuners = {}
    for spec in specs:
        model = planned.get(spec.name)
        if model is None:
            applied.append(spec)
            continue
        replicas = model.replicas
        if model.planned_peaks:
            tuners[spec.key] = Tuner(replicas, model.planned_peaks)
        pool = msgspec.structs.replace(
            spec.pool, min_replicas=replicas, max_replicas=max(spec.pool.max_replicas, replicas)
        )
        resources = msgspec.structs.replace(spec.resources, threads=model.resources.cpus)
        try:
            applied.append(
                ModelSpec.from_dict(
                    {
                        **spec.to_dict(),
                        "max_batch_size": model.max_batch_size,
                        "max_delay_ms": model.max_delay_ms,
                        "pool": msgspec.to_builtins(pool),
                        "resources": msgspec.to_builtins(resources),
                    }
                )
            )
        except (TypeError, ValueError, msgspec.ValidationError) as exc:
            raise TargetLoadError(f"--plan {path}: model {spec.name!r}: {exc}") from None
    return AppliedPlan(applied, tuners)
