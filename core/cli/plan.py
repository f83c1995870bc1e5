"""``ketch plan FILE PIPELINE --profile profile.json --slo-ms S (--rate R | --trace FILE)
[--cost FILE] [--share MODEL=F] --out plan.json``.

Plans a pipeline of the served file (:mod:`ketch.planning.planner`): the cheapest batch sizes,
replicas and resource options found whose simulated p99, under the arrivals of a Poisson
process at ``--rate`` (or the moments of ``--trace``), meets the objective. It prints a table
per model and the total cost, and writes the plan as JSON.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Any

from ketch.applications.state import default_state_dir
from ketch.cli.status import table
from ketch.errors import TargetLoadError
from ketch.planning.planner import START_UTILIZATION, Plan, PlanError, plan
from ketch.planning.profiles import ProfileError, load_profile
from ketch.planning.simulator import ModelConfig, SimStep, percentile, poisson_arrivals
from ketch.planning.tuner import envelope
from ketch.plugin_manager import load_plugins
from ketch.pools.discovery import discover_served
from ketch.pools.envs import Environments
from ketch.specs.pipelines import PipelineSpec, WhenUnsure


def pipeline_steps(spec: PipelineSpec, shares: dict[str, float]) -> tuple[list[SimStep], list[str]]:
    """The pipeline's steps for the simulator, and a note for each ``when_unsure`` step whose
    share was not given (planned as if every query took it)."""
    steps, notes = [], []
    for number, step in enumerate(spec.steps, 1):
        models = step.models()
        share = 1.0
        if isinstance(step, WhenUnsure):
            if step.model in shares:
                share = shares[step.model]
            else:
                notes.append(
                    f"step {number} ({step.model}, when unsure) is planned as if every query "
                    f"took it: give its share with --share {step.model}=F (GET /apps shows it)"
                )
        steps.append(SimStep(tuple(m.partition(":")[0] for m in models), share))
    return steps, notes


def read_trace(path: Path) -> list[float]:
    """Arrival moments in seconds: a JSON list, or one number per line."""
    try:
        text = path.read_text()
        values = json.loads(text) if text.lstrip().startswith("[") else text.split()
        arrivals = sorted(float(v) for v in values)
    except (OSError, ValueError, TypeError) as exc:
        raise PlanError(f"--trace {path}: {exc}") from None
    return arrivals


def read_core_cost(path: Path | None) -> tuple[float, str]:
    """The price of one core (of a replica) and its unit: ``{"core": 0.04, "unit": "$/h"}``;
    by default 1 per core, so the cost counts cores."""
    if path is None:
        return 1.0, "cores"
    try:
        data = json.loads(path.read_text())
        price = float(data["core"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlanError(
            f"--cost {path}: a JSON object with the price of one core: {exc!r}"
        ) from None
    if not price > 0:
        raise PlanError(f"--cost {path}: the price of a core must be > 0, got {price}")
    return price, str(data.get("unit", "per core"))


def plan_document(
    pipeline: str, slo_ms: float, arrivals: list[float], made: Plan, unit: str
) -> dict[str, Any]:
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    return {
        "pipeline": pipeline,
        "slo_ms": slo_ms,
        "rate": round(rate, 3),
        "arrivals": len(arrivals),
        "models": {
            name: {
                "max_batch_size": config.batch_size,
                "max_delay_ms": config.max_delay_s * 1000,
                "replicas": config.replicas,
                "resources": {"cpus": config.option.cores},
                "utilization": round(made.outcome.utilization[name], 3),
                "simulated_p99_ms": round(
                    percentile(made.outcome.model_latencies_s[name], 99) * 1000, 3
                ),
                # What the plan was proven for, the tuner's reference live: per window length,
                # the most arrivals the simulation saw, or what the replicas serve in that
                # long at 70% utilization, whichever is more.
                "planned_peaks": {
                    f"{window:g}": max(count, math.floor(served_per_s(config) * window))
                    for window, count in envelope(made.outcome.model_arrivals_s[name]).items()
                },
            }
            for name, config in made.configs.items()
        },
        "predicted_p99_ms": round(made.p99_s * 1000, 3),
        "cost": round(made.cost, 6),
        "cost_unit": unit,
    }


def served_per_s(config: ModelConfig) -> float:
    """The queries a model's replicas serve a second at its batch size, at the planner's
    starting utilization (headroom for bursts)."""
    p50, _ = config.option.times(config.batch_size)
    return config.replicas * config.batch_size / p50 * START_UTILIZATION if p50 > 0 else 1e9


def plan_table(document: dict[str, Any]) -> str:
    rows = [["MODEL", "BATCH", "MAX DELAY MS", "REPLICAS", "CPUS", "UTILIZATION", "P99 MS"]]
    for name, model in document["models"].items():
        rows.append(
            [
                name,
                str(model["max_batch_size"]),
                f"{model['max_delay_ms']:g}",
                str(model["replicas"]),
                str(model["resources"]["cpus"]),
                f"{model['utilization']:.2f}",
                f"{model['simulated_p99_ms']:.1f}",
            ]
        )
    return table(rows)


async def _pipeline(source: str, name: str) -> PipelineSpec:
    plugins = load_plugins()
    environments = Environments(default_state_dir() / "store" / "envs")
    try:
        served = await discover_served(source, plugins, environments, lambda event: None)
    except TargetLoadError as exc:
        raise PlanError(str(exc)) from None
    for spec in served.pipelines:
        if spec.name == name:
            return spec
    known = sorted(p.name for p in served.pipelines)
    raise PlanError(f"{source} declares no pipeline {name!r} (its pipelines: {known or 'none'})")


def run_plan(args: Any) -> int:
    """``ketch plan``: plan, write ``--out``, print the table and the total."""
    try:
        spec = asyncio.run(_pipeline(args.source, args.pipeline))
        profiles = load_profile(args.profile)
        steps, notes = pipeline_steps(spec, dict(args.share))
        if args.trace is not None:
            arrivals = read_trace(args.trace)
        else:
            arrivals = poisson_arrivals(args.rate, args.queries, args.seed)
        price, unit = read_core_cost(args.cost)
        made = plan(steps, profiles, args.slo_ms / 1000, arrivals, price, args.seed)
    except (PlanError, ProfileError) as exc:
        print(f"ketch: error: {exc}", file=sys.stderr)
        return 2
    document = plan_document(spec.name, args.slo_ms, arrivals, made, unit)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    for note in notes:
        print(f"ketch: note: {note}")
    print(plan_table(document))
    print(
        f"predicted p99 {document['predicted_p99_ms']:.1f} ms (objective {args.slo_ms:g} ms) at "
        f"{document['rate']:g} queries/s; cost {document['cost']:g} {unit}"
    )
    print(f"ketch: plan written to {args.out}")
    return 0
