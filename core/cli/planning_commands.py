"""The parsers of ``ketch profile`` and ``ketch plan`` (``docs/planning.md``); what they run
is in :mod:`ketch.cli.profile` and :mod:`ketch.cli.plan`, imported only when they run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeAlias

from ketch.cli.arg_types import positive_float, positive_int

_Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_planning_commands(commands: _Subcommands) -> None:
    profile_cmd = commands.add_parser(
        "profile",
        help="measure each model of a file on this machine: latency and throughput per batch "
        "size and per number of cores",
    )
    profile_cmd.add_argument("source", help="the served file (PATH.py) or module")
    profile_cmd.add_argument(
        "--models", type=model_names, default=None, help="only these models, comma-separated"
    )
    profile_cmd.add_argument(
        "--inputs",
        type=Path,
        default=None,
        metavar="SAMPLES.json",
        help="sample inputs: a JSON object of each model's name to a list of inputs (default: "
        "made from a model's one declared numeric input tensor)",
    )
    profile_cmd.add_argument(
        "--cpus",
        type=core_counts,
        default=None,
        metavar="N,M",
        help="the numbers of cores to compare (default 1 and all of this machine's)",
    )
    profile_cmd.add_argument(
        "--repeats", type=positive_int, default=30, help="timed batches per size"
    )
    profile_cmd.add_argument("--warmup", type=positive_int, default=3, help="untimed batches first")
    profile_cmd.add_argument(
        "--out", type=Path, default=Path("profile.json"), help="where the profile is written"
    )
    plan_cmd = commands.add_parser(
        "plan",
        help="plan a pipeline's models (batch sizes, replicas, cores) to a p99 objective at the "
        "least cost, from a profile",
    )
    plan_cmd.add_argument("source", help="the served file (PATH.py) or module")
    plan_cmd.add_argument("pipeline", help="the pipeline to plan")
    plan_cmd.add_argument("--profile", type=Path, required=True, help="what ketch profile wrote")
    plan_cmd.add_argument(
        "--slo-ms", type=positive_float, required=True, help="the p99 objective (ms)"
    )
    arrivals = plan_cmd.add_mutually_exclusive_group(required=True)
    arrivals.add_argument(
        "--rate", type=positive_float, help="queries per second, as a Poisson process"
    )
    arrivals.add_argument(
        "--trace",
        type=Path,
        help="arrival moments in seconds: a JSON list, or one number per line",
    )
    plan_cmd.add_argument(
        "--queries", type=positive_int, default=4000, help="queries simulated with --rate"
    )
    plan_cmd.add_argument(
        "--share",
        type=model_share,
        action="append",
        default=[],
        metavar="MODEL=F",
        help="how often a when_unsure step's model runs per query (GET /apps shows it)",
    )
    plan_cmd.add_argument(
        "--cost", type=Path, default=None, help='the price of a core: {"core": 0.04, "unit": "$/h"}'
    )
    plan_cmd.add_argument("--seed", type=int, default=0, help="the simulation's seed")
    plan_cmd.add_argument(
        "--out", type=Path, default=Path("plan.json"), help="where the plan is written"
    )


def model_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"name at least one model, got {text!r}")
    return names


def core_counts(text: str) -> list[int]:
    return sorted({positive_int(part.strip()) for part in text.split(",")})


def model_share(text: str) -> tuple[str, float]:
    model, _, share = text.partition("=")
    try:
        value = float(share)
    except ValueError:
        value = -1.0
    if not model or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"give MODEL=F with F in [0, 1], got {text!r}")
    return model, value
