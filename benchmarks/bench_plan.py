"""ketch's plan and tuner against two baselines, on one pipeline and one bursty trace.

The pipeline has three stages of emulated accelerators: each sleeps a fixed time per batch
plus a time per item (so replicas scale on a small machine: a sleeping worker takes no core);
the third runs only when the second is unsure (30% of the queries). The trace is bursty
(gamma inter-arrival times with a squared coefficient of variation of 4) with a rate step in
the middle (1.5x). In one run the benchmark:

1. profiles the stages (``ketch profile --cpus 1``) and plans the pipeline
   (``ketch plan --trace``) on the trace's first half, the objective ``--slo-ms``;
2. replays the whole trace, open loop, against three servers in turn: **plan** (``ketch serve
   --plan``, its tuner following the arrival envelope), **peak** (every stage at batch size 1,
   with the replicas the simulator finds meet the objective on the whole trace, kept), and
   **autoscaler** (the served file as it is, today's autoscaler alone);
3. prints, for each: queries, the share past the objective (or failed), p99, and cost in
   replica-seconds (the stages' ready replicas, sampled every 0.25 s); the plan's cost over
   the peak's; and the simulator's p99 for the plan on the replayed trace next to the measured
   one. With matplotlib installed (``pip install 'ketch[bench]'``) it draws arrivals, replicas
   per stage and latency over time to ``--plot``.

Run from anywhere::

    python benchmarks/bench_plan.py [--rate 30] [--duration 60] [--slo-ms 200]

Exit code 0 once the figures are printed (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from ketch_server import KetchServer, ketch_executable, write_models

from ketch.planning.planner import provision
from ketch.planning.profiles import load_profile
from ketch.planning.simulator import ModelConfig, SimStep, simulate

STAGES = {"detect": (0.010, 0.002), "embed": (0.015, 0.003), "rerank": (0.030, 0.006)}
UNSURE_SHARE = 0.3
STEPS = [SimStep(("detect",)), SimStep(("embed",)), SimStep(("rerank",), UNSURE_SHARE)]
MODELS = """
import time

import ketch

COSTS = {costs!r}


def stage(name):
    fixed, per_item = COSTS[name]

    def compute(xs):
        time.sleep(fixed + per_item * len(xs))  # an emulated accelerator: no core used
        return [float(x) if not isinstance(x, dict) else float(x["x"]) for x in xs]

    return compute


@ketch.model(max_batch_size=16, max_replicas=16, idle_timeout_s=5,
             inputs=[ketch.TensorSpec("x", "float32", ())])
def detect(xs):
    return stage("detect")(xs)


@ketch.model(max_batch_size=16, max_replicas=16, idle_timeout_s=5,
             inputs=[ketch.TensorSpec("x", "float32", ())])
def embed(xs):
    values = stage("embed")(xs)
    # Unsure of about {share:.0%} of the queries: the last digit decides, as a hash would.
    return [{{"x": v, "confidence": 0.3 if int(v) % 10 < {unsure} else 0.9}} for v in values]


@ketch.model(max_batch_size=16, max_replicas=16, idle_timeout_s=5,
             inputs=[ketch.TensorSpec("x", "float32", ())])
def rerank(xs):
    return stage("rerank")(xs)


search = ketch.pipeline(
    "search", steps=["detect", "embed", ketch.when_unsure("rerank", below=0.8)]
)
"""


def bursty_trace(rate: float, duration_s: float, seed: int) -> list[float]:
    """Gamma inter-arrivals of shape 1/4 (squared coefficient of variation 4) at ``rate``
    for the first half, 1.5 x ``rate`` for the second."""
    draws = random.Random(seed)
    shape = 0.25
    moments, now = [], 0.0
    while now < duration_s:
        current = rate if now < duration_s / 2 else rate * 1.5
        now += draws.gammavariate(shape, 1 / (shape * current))
        moments.append(now)
    return moments[:-1]


def ketch_command(folder: Path, *args: str) -> None:
    done = subprocess.run(
        [ketch_executable(), *args], cwd=folder, capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise SystemExit(f"ketch {' '.join(args)} failed:\n{done.stderr}")
    print(done.stdout.rstrip())


def peak_plan(folder: Path, trace: list[float], slo_s: float) -> dict[str, Any]:
    """Every stage at batch size 1, with the replicas the simulator finds meet the objective
    on the whole trace (its peak included), kept: provisioned for the peak."""
    profiles = load_profile(folder / "profile.json")
    configs, _ = provision(STEPS, profiles, slo_s, trace, batch_size=1)
    models = {
        name: {
            "max_batch_size": 1,
            "max_delay_ms": 0,
            "replicas": config.replicas,
            "resources": {"cpus": config.option.cores},
        }
        for name, config in configs.items()
    }
    return {"pipeline": "search", "models": models}


class Replicas:
    """The stages' ready replicas, sampled from GET /models while a replay runs."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Replicas:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(base_url=self._url, timeout=10) as client:
            while not self._stop.wait(0.25):
                models = client.get("/models").json()["models"]
                ready = {m["name"]: m["replicas"]["ready"] for m in models}
                self.samples.append((time.monotonic(), ready))

    def replica_seconds(self) -> float:
        total = 0.0
        for (t0, ready), (t1, _) in zip(self.samples, self.samples[1:], strict=False):
            total += (t1 - t0) * sum(ready.get(name, 0) for name in STAGES)
        return total


async def replay(url: str, trace: list[float], timeout_s: float) -> list[tuple[float, float, int]]:
    """Send a query at each moment of ``trace`` (open loop): (sent at, latency, status)."""
    results: list[tuple[float, float, int]] = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        start = time.monotonic()

        async def one(index: int, at: float) -> None:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))  # the trace's moment
            began = time.monotonic()
            try:
                answer = await client.post("/apps/search/predict", json={"input": index % 100})
                status = answer.status_code
            except httpx.HTTPError:
                status = 0
            results.append((began - start, time.monotonic() - began, status))

        await asyncio.gather(*(one(i, at) for i, at in enumerate(trace)))
    return results


def run(folder: Path, trace: list[float], slo_s: float, extra: tuple[str, ...]) -> dict[str, Any]:
    with KetchServer(folder / "models.py", extra) as server:
        url = server.start(120)
        with Replicas(url) as replicas:
            results = asyncio.run(replay(url, trace, 30))
        latencies = sorted(latency for _, latency, _ in results)
        missed = sum(1 for _, latency, status in results if status != 200 or latency > slo_s)
        return {
            "queries": len(results),
            "missed": missed / len(results),
            "p99_ms": latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]
            * 1000,
            "cost": replicas.replica_seconds(),
            "results": results,
            "replicas": replicas.samples,
        }


def simulated_p99_ms(folder: Path, plan: dict[str, Any], trace: list[float]) -> float:
    profiles = load_profile(folder / "profile.json")
    configs = {
        name: ModelConfig(
            batch_size=model["max_batch_size"],
            replicas=model["replicas"],
            option=profiles[name].options[0],
        )
        for name, model in plan["models"].items()
    }
    return simulate(STEPS, configs, trace).p99_s * 1000


def plot(path: Path, trace: list[float], runs: dict[str, dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install 'ketch[bench]' for matplotlib)")
        return
    figure, (arrivals, replicas, latency) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    arrivals.hist(trace, bins=int(trace[-1]) + 1)
    arrivals.set_ylabel("arrivals / s")
    for label, measured in runs.items():
        start = measured["replicas"][0][0] if measured["replicas"] else 0
        times = [t - start for t, _ in measured["replicas"]]
        replicas.plot(times, [sum(r.values()) for _, r in measured["replicas"]], label=label)
        sent = [s for s, _, _ in measured["results"]]
        latency.scatter(sent, [1000 * took for _, took, _ in measured["results"]], s=2, label=label)
    replicas.set_ylabel("replicas (all stages)")
    replicas.legend()
    latency.set_ylabel("latency (ms)")
    latency.set_xlabel("seconds into the trace")
    latency.set_yscale("log")
    latency.legend()
    figure.tight_layout()
    figure.savefig(path)
    print(f"plot written to {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=30.0, help="queries/s before the step")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of trace")
    parser.add_argument("--slo-ms", type=float, default=200.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--plot", type=Path, default=Path("bench_plan.png"))
    args = parser.parse_args()
    trace = bursty_trace(args.rate, args.duration, args.seed)
    first_half = [t for t in trace if t < args.duration / 2]
    with tempfile.TemporaryDirectory(prefix="ketch-bench-plan-") as tmp:
        folder = Path(tmp)
        write_models(
            folder,
            MODELS.format(costs=STAGES, share=UNSURE_SHARE, unsure=round(10 * UNSURE_SHARE)),
        )
        (folder / "first_half.json").write_text(json.dumps(first_half))
        ketch_command(folder, "profile", "models.py", "--cpus", "1", "--repeats", "10")
        ketch_command(
            folder, "plan", "models.py", "search", "--profile", "profile.json",
            "--slo-ms", str(args.slo_ms), "--trace", "first_half.json",
            "--share", f"rerank={UNSURE_SHARE}",
        )  # fmt: skip
        plan = json.loads((folder / "plan.json").read_text())
        slo_s = args.slo_ms / 1000
        (folder / "peak.json").write_text(json.dumps(peak_plan(folder, trace, slo_s)))
        runs = {
            "plan": run(folder, trace, slo_s, ("--plan", "plan.json")),
            "peak": run(folder, trace, slo_s, ("--plan", "peak.json")),
            "autoscaler": run(folder, trace, slo_s, ()),
        }
        print(
            f"\ntrace: {len(trace)} queries over {args.duration:g} s, {args.rate:g}/s then "
            f"{1.5 * args.rate:g}/s, bursty (CV^2 4); objective p99 {args.slo_ms:g} ms"
        )
        print(f"{'config':<11} {'queries':>8} {'missed':>8} {'p99 ms':>9} {'replica-s':>10}")
        for label, measured in runs.items():
            print(
                f"{label:<11} {measured['queries']:>8} {measured['missed']:>8.2%} "
                f"{measured['p99_ms']:>9.1f} {measured['cost']:>10.1f}"
            )
        ratio = runs["plan"]["cost"] / runs["peak"]["cost"]
        print(f"plan cost / peak cost: {ratio:.2f}")
        first = [r for r in runs["plan"]["results"] if r[0] < args.duration / 2]
        measured_first = sorted(latency for _, latency, _ in first)
        measured_p99 = measured_first[math.ceil(0.99 * len(measured_first)) - 1] * 1000
        simulated = simulated_p99_ms(folder, plan, first_half)
        print(
            f"first half (the plan's own trace): simulated p99 {simulated:.1f} ms, measured "
            f"{measured_p99:.1f} ms ({simulated / measured_p99:.2f}x)"
        )
        plot(args.plot, trace, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
