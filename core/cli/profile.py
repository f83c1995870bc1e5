"""``ketch profile FILE [--models a,b] [--inputs SAMPLES.json] --out profile.json``.

Measures each model of the served file on this machine, the way its workers run it: for
each resource option worth comparing (by default one core, and every core when there are
more), a fresh worker process (:mod:`ketch.worker.profile`) loads the model with those
resources and times its batch call at batch sizes 1, 2, 4, ... up to its ``max_batch_size``:
median and 99th percentile latency, and throughput. The profile is what ``ketch plan`` sizes a
pipeline from; it is written as JSON, and printed as a table.

Sample inputs come from ``--inputs`` (a JSON object: each model's name to a list of inputs,
as a request would send them), or are made from a model's one declared numeric input tensor.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec

from ketch.applications.state import default_state_dir
from ketch.cli.status import table
from ketch.errors import TargetLoadError
from ketch.plugin_manager import load_plugins
from ketch.pools.discovery import discover_served
from ketch.pools.envs import Environments
from ketch.serving.dispatcher import version_order
from ketch.specs.models import ModelSpec
from ketch.worker.plan import WorkerPlan

#: The longest one model's profile at one resource option may take.
PROFILE_TIMEOUT_S = 600.0


class ProfileError(Exception):
    """What stops a profile, said to the user (exit 2)."""


def batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch_size``, which is always the last."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_size]


def resource_options(cpus: list[int] | None) -> list[dict[str, Any]]:
    """Each option as the resources a worker gets: ``n`` cores (the first ``n``, pinned) and
    as many math-library threads; by default 1 and all of this machine's."""
    available = len(os.sched_getaffinity(0))
    counts = cpus or sorted({1, available})
    if too_many := [n for n in counts if not 1 <= n <= available]:
        raise ProfileError(f"--cpus {too_many}: this machine has {available} cores to give")
    return [{"cpus": list(range(n)), "threads": n} for n in counts]


async def profile(
    source: str,
    models: list[str] | None,
    samples_file: Path | None,
    cpus: list[int] | None,
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    """The profile of ``source``'s models (all, or those named), as :data:`ketch profile`
    writes it."""
    plugins = load_plugins()
    environments = Environments(default_state_dir() / "store" / "envs")
    try:
        served = await discover_served(source, plugins, environments, lambda event: None)
    except TargetLoadError as exc:
        raise ProfileError(str(exc)) from None
    chosen = _chosen(served.models, models)
    samples = _samples(samples_file)
    options = resource_options(cpus)
    profiled: dict[str, Any] = {}
    for spec in chosen:
        results = []
        for resources in options:
            measured = await asyncio.to_thread(
                _measure, source, spec, resources, samples.get(spec.name), repeats, warmup
            )
            results.append({"resources": resources, "batches": measured})
        profiled[spec.name] = {
            "version": spec.version,
            "max_batch_size": spec.max_batch_size,
            "options": results,
        }
    return {
        "machine": {
            "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "repeats": repeats,
        "models": profiled,
    }


def _chosen(specs: list[ModelSpec], names: list[str] | None) -> list[ModelSpec]:
    if not names:
        return specs
    known = {spec.name for spec in specs}
    if unknown := [n for n in names if n not in known]:
        raise ProfileError(
            f"--models names {unknown}, which the file does not declare {sorted(known)}"
        )
    # The highest version of each model named, as requests without a version get.
    return [
        max((s for s in specs if s.name == name), key=lambda s: version_order(s.version))
        for name in dict.fromkeys(names)
    ]


def _samples(path: Path | None) -> dict[str, list[Any]]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProfileError(f"--inputs {path}: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(inputs, list) and inputs for inputs in data.values()
    ):
        raise ProfileError(
            f"--inputs {path} must be a JSON object of each model's name to a non-empty list "
            "of inputs"
        )
    return data


def _measure(
    source: str,
    spec: ModelSpec,
    resources: dict[str, Any],
    samples: list[Any] | None,
    repeats: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """One model at one resource option, timed in a worker process of its own."""
    declared = msgspec.to_builtins(spec.resources)
    plan = WorkerPlan(
        target=f"{source}:{spec.name}",
        version=spec.version,
        broker="",
        resources={**declared, **resources},
        deployment=spec.to_dict() if spec.deployed else None,
        managed=False,
    )
    request = {
        "plan": plan.to_json(),
        "resources": resources,
        "samples": samples,
        "batch_sizes": batch_sizes(spec.max_batch_size),
        "repeats": repeats,
        "warmup": warmup,
    }
    answer_r, answer_w = os.pipe()
    try:
        child = subprocess.Popen(
            [spec.start.python or sys.executable, "-m", "ketch.worker.profile", str(answer_w)],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(answer_w,),
            text=True,
        )
    finally:
        os.close(answer_w)
    with os.fdopen(answer_r) as answer:
        try:
            _, stderr = child.communicate(json.dumps(request), timeout=PROFILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise ProfileError(
                f"profiling model {spec.label()!r} took more than {PROFILE_TIMEOUT_S:g} s"
            ) from None
        text = answer.read()
    if child.returncode != 0 or not text:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        raise ProfileError(f"profiling model {spec.label()!r} failed:\n{tail}")
    result: dict[str, Any] = json.loads(text)
    if "error" in result:
        raise ProfileError(str(result["error"]))
    batches: list[dict[str, Any]] = result["batches"]
    return batches


def profile_table(profiled: dict[str, Any]) -> str:
    """The profile as the lines ``ketch profile`` prints."""
    rows = [["MODEL", "CPUS", "BATCH", "P50 MS", "P99 MS", "ITEMS/S"]]
    for name, model in profiled["models"].items():
        for option in model["options"]:
            for batch in option["batches"]:
                rows.append(
                    [
                        name,
                        str(len(option["resources"]["cpus"])),
                        str(batch["batch_size"]),
                        f"{batch['p50_ms']:.3f}",
                        f"{batch['p99_ms']:.3f}",
                        f"{batch['throughput']:.1f}",
                    ]
                )
    return table(rows)


def run_profile(args: Any) -> int:
    """``ketch profile``: measure, write ``--out``, print the table."""
    try:
        profiled = asyncio.run(
            profile(args.source, args.models, args.inputs, args.cpus, args.repeats, args.warmup)
        )
    except ProfileError as exc:
        print(f"ketch: error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(profiled, indent=2) + "\n")
    print(profile_table(profiled))
    print(f"ketch: profile written to {args.out}")
    return 0
