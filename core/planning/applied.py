"""A plan applied to the models a server serves: at start (``ketch serve --plan plan.json``)
or live (``POST /admin/plan``, ``ketch models plan plan.json``).

Each model the plan names is served with the plan's batch size and delay, and its pool keeps
the plan's replicas warm (``min_replicas``; ``max_replicas`` is raised to them if it was
lower, so the pool can still grow past them under a burst), each worker with the plan's cores
as its math libraries' threads, and its tuner (:mod:`ketch.planning.tuner`) scales it from
the arrivals the plan was proven for (``planned_peaks``). Every version of a named model
takes the plan. A plan that names a model the server does not serve, or that is not a plan
``ketch plan`` wrote, is refused with the reason (at start, the start stops).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from ketch.errors import TargetLoadError
from ketch.planning.tuner import Tuner
from ketch.specs.models import ModelSpec


@dataclass(frozen=True, slots=True)
class AppliedPlan:
    """The served models with the plan applied, and a tuner for each planned version."""

    specs: list[ModelSpec]
    tuners: dict[tuple[str, str], Tuner]


class PlannedResources(msgspec.Struct):
    cpus: Annotated[int, Meta(ge=1)]


class PlannedModel(msgspec.Struct):
    """One model of ``plan.json``, as ``ketch plan`` writes it (other keys are ignored)."""

    max_batch_size: Annotated[int, Meta(ge=1)]
    max_delay_ms: Annotated[float, Meta(ge=0)]
    replicas: Annotated[int, Meta(ge=0)]
    resources: PlannedResources
    planned_peaks: dict[float, Annotated[int, Meta(ge=0)]] = msgspec.field(default_factory=dict)


class Plan(msgspec.Struct):
    """``plan.json``: the models it sizes (its other keys are ignored)."""

    models: dict[str, PlannedModel]


def read_plan(path: Path) -> dict[str, PlannedModel]:
    """The plan's models; raises :class:`TargetLoadError`."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=Plan).models
    except (OSError, msgspec.DecodeError) as exc:
        raise TargetLoadError(f"--plan {path} is not a plan ketch plan wrote: {exc}") from None


def planned_spec(spec: ModelSpec, model: PlannedModel) -> ModelSpec:
    """``spec`` served as ``model`` plans it; raises ``ValueError`` when the spec refuses the
    plan's values (a batch size its runtime cannot take, say)."""
    replicas = model.replicas
    pool = msgspec.structs.replace(
        spec.pool, min_replicas=replicas, max_replicas=max(spec.pool.max_replicas, replicas)
    )
    resources = msgspec.structs.replace(spec.resources, threads=model.resources.cpus)
    try:
        return ModelSpec.from_dict(
            {
                **spec.to_dict(),
                "max_batch_size": model.max_batch_size,
                "max_delay_ms": model.max_delay_ms,
                "pool": msgspec.to_builtins(pool),
                "resources": msgspec.to_builtins(resources),
            }
        )
    except (TypeError, msgspec.ValidationError) as exc:
        raise ValueError(str(exc)) from None


def tuner_of(model: PlannedModel) -> Tuner | None:
    """The tuner of a planned model (None: the plan gives no arrivals to scale from)."""
    return Tuner(model.replicas, model.planned_peaks) if model.planned_peaks else None


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
        if (tuner := tuner_of(model)) is not None:
            tuners[spec.key] = tuner
        try:
            applied.append(planned_spec(spec, model))
        except ValueError as exc:
            raise TargetLoadError(f"--plan {path}: model {spec.name!r}: {exc}") from None
    return AppliedPlan(applied, tuners)
