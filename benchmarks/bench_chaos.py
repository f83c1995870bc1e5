"""Faults heal: does ketch keep answering while its workers are SIGKILLed under load?

The benchmark writes a models file to a temporary directory::

    @ketch.model(max_batch_size=1, min_replicas=3, max_replicas=3)
    def double(xs): ...   # burns --burn-ms of CPU per input, then doubles it

serves it with ``ketch serve``, waits for ``ketch: ready`` and the three workers, and runs two
phases of the same load on the same server, each for ``--duration`` seconds:

1. **baseline**: ``--clients`` (16) closed-loop clients send ``POST /models/double/predict``,
   nothing is killed;
2. **kills**: the same load while every ``--kill-every`` (2 s) a random worker of the model, as
   ``GET /models`` lists them, is SIGKILLed. Only a pid that is in the server's process group and
   is not the server itself is killed, so the gateway is never hit.

Every request has a total client-side deadline (``--client-timeout``, 30 s, shorter than the
server's 60 s ``--request-timeout``). Each is counted once: answered (by HTTP status: 200 with
the right output, 200 with a wrong one, 5xx, other), hung (no answer by the deadline) or a
connection error (no HTTP answer at all). When the duration ends the clients send nothing new
but wait for what is in flight, so every request sent is accounted for. It prints both phases,
the ratio of their 200 rates and the target ``0 hung, 0 unanswered, >= 99% 200`` for the kill
phase, ``met`` or ``NOT met``.

The exit code is 0 whether or not the target is met (a benchmark, not a test); 1 when nothing
could be measured (the server did not start, say); 130 on Ctrl-C. The server runs in its own
process group, which is stopped and then killed however the run ends.

Run from anywhere: ``python benchmarks/bench_chaos.py [--duration 60] [--kill-every 2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from gateway_run import _stop_early, ending_signals_unwind
from ketch_server import WORKER_LOST, WORKER_READY, KetchServer, write_models
from loadgen import _run_loop
from procstat import CpuSample, CpuShares, group_members
from report import at_least, percentile
from server_process import ServerError

from ketch.cli.arg_types import positive_float

MODEL = "double"
REPLICAS = 3
MODELS_SOURCE = """
    import time

    import ketch

    BURN_S = {burn_ms!r} / 1000


    @ketch.model(max_batch_size=1, min_replicas={replicas}, max_replicas={replicas})
    def double(xs):
        # CPU time of this thread, not a sleep: a little real work for each worker to lose.
        out = []
        for x in xs:
            end = time.thread_time() + BURN_S
            while time.thread_time() < end:
                pass
            out.append(2 * x)
        return out
"""
HEADERS = {"Content-Type": "application/json"}
#: Inputs of client i start at i * INPUT_STRIDE, so an answer meant for another request shows.
INPUT_STRIDE = 1_000_000
#: The share of requests sent that must be answered 200 (with the right output).
TARGET_OK_SHARE = 0.99
#: CPU taken by unrelated processes during a phase, in cores, above which figures are suspect.
NOISY_OTHER_CPU = 0.25


@dataclass
class Tally:
    """What the clients of one phase saw; every request sent lands in exactly one count."""

    sent: int = 0
    ok: int = 0
    #: 200s whose output is not twice the input: a mixed-up or corrupted answer.
    wrong: int = 0
    #: Every answer but 200, by status.
    statuses: Counter[int] = field(default_factory=Counter)
    #: No answer within the client timeout.
    hung: int = 0
    #: No HTTP answer at all (refused, reset, closed mid-response), by exception name.
    connection_errors: Counter[str] = field(default_factory=Counter)
    #: Seconds each 200 with the right output took.
    latencies_s: list[float] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return self.ok + self.wrong + sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    @property
    def other_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status < 500)

    @property
    def unanswered(self) -> int:
        return self.sent - self.answered

    @property
    def ok_share(self) -> float:
        return self.ok / self.sent if self.sent else 0.0


@dataclass
class KillLog:
    pids: list[int] = field(default_factory=list)
    #: Moments when GET /models listed no worker of the server's own to kill.
    no_worker: int = 0
    #: Moments when GET /models itself failed.
    status_failures: int = 0


@dataclass
class Phase:
    name: str
    duration_s: float
    tally: Tally = field(default_factory=Tally)
    kills: KillLog | None = None
    cpu: CpuShares | None = None
    #: The server's stdout lines printed during the phase (and the wait for its stragglers).
    lines: list[str] = field(default_factory=list)
    #: The model's entry in GET /models once the phase's load had stopped.
    status_after: dict[str, Any] = field(default_factory=dict)


def _classify(tally: Tally, response: httpx.Response, value: int, latency_s: float) -> None:
    if response.status_code != 200:
        tally.statuses[response.status_code] += 1
        return
    try:
        right = response.json().get("output") == 2 * value
    except (ValueError, AttributeError):
        right = False
    if right:
        tally.ok += 1
        tally.latencies_s.append(latency_s)
    else:
        tally.wrong += 1


async def _one_request(
    client: httpx.AsyncClient, url: str, value: int, timeout_s: float, tally: Tally
) -> None:
    tally.sent += 1
    body = json.dumps({"input": value}).encode()
    start = time.perf_counter()
    try:
        # One deadline for the whole request; httpx's own timeouts are per read or write.
        async with asyncio.timeout(timeout_s):
            response = await client.post(url, content=body, headers=HEADERS)
    except (TimeoutError, httpx.TimeoutException):
        tally.hung += 1
        return
    except httpx.TransportError as exc:
        tally.connection_errors[type(exc).__name__] += 1
        return
    _classify(tally, response, value, time.perf_counter() - start)


async def _client_loop(
    client: httpx.AsyncClient, url: str, index: int, stop_at: float, timeout_s: float, tally: Tally
) -> None:
    """One closed loop: the next request goes when the last one is settled, until ``stop_at``."""
    loop = asyncio.get_running_loop()
    value = index * INPUT_STRIDE
    while loop.time() < stop_at:
        value += 1
        await _one_request(client, url, value, timeout_s, tally)


def _choose_victim(server: KetchServer, rng: random.Random) -> int | None:
    """A random worker pid of the model from GET /models that belongs to this server."""
    listed = {int(worker["pid"]) for worker in server.model_status(MODEL).get("workers", [])}
    # Only our own processes: a remote worker, or a pid reused since GET /models answered, is
    # not in the server's group; the server itself (the gateway) is its group's leader.
    ours = {pid for pid, state, _ in group_members(server.pgid) if state != "Z"}
    candidates = sorted((listed & ours) - {server.pgid})
    return rng.choice(candidates) if candidates else None


def _kill_one(server: KetchServer, rng: random.Random, kills: KillLog) -> None:
    try:
        pid = _choose_victim(server, rng)
    except ServerError:
        kills.status_failures += 1
        return
    if pid is None:
        kills.no_worker += 1
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # exited between the listing and the kill
        kills.no_worker += 1
        return
    kills.pids.append(pid)


async def _kill_loop(
    server: KetchServer, every_s: float, stop_at: float, rng: random.Random, kills: KillLog
) -> None:
    loop = asyncio.get_running_loop()
    next_at = loop.time() + every_s
    while next_at < stop_at:
        await asyncio.sleep(next_at - loop.time())  # the kill schedule, not a wait for a peer
        next_at += every_s
        # GET /models is a blocking call; in a thread it does not stall the clients.
        await asyncio.to_thread(_kill_one, server, rng, kills)


async def _drive(
    server: KetchServer, args: argparse.Namespace, phase: Phase, rng: random.Random | None
) -> None:
    url = f"{server.base_url}/models/{MODEL}/predict"
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.client_timeout)  # the outer deadline in _one_request decides
    stop_at = asyncio.get_running_loop().time() + phase.duration_s
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        async with asyncio.TaskGroup() as group:
            for index in range(args.clients):
                group.create_task(
                    _client_loop(client, url, index, stop_at, args.client_timeout, phase.tally)
                )
            if phase.kills is not None and rng is not None:
                group.create_task(_kill_loop(server, args.kill_every, stop_at, rng, phase.kills))


def _drain_lines(server: KetchServer) -> list[str]:
    """The server's stdout lines not read yet (its exit, if it has exited, as the last one)."""
    lines: list[str] = []
    try:
        while (line := server.next_line(0)) is not None:
            lines.append(line)
    except ServerError:
        lines.append("(the server has exited)")
    return lines


def _run_phase(
    server: KetchServer, args: argparse.Namespace, name: str, rng: random.Random | None
) -> Phase:
    phase = Phase(name, args.duration, kills=KillLog() if rng is not None else None)
    print(f"{name}: {args.clients} clients for {args.duration:g} s ...", file=sys.stderr)
    _drain_lines(server)  # what came before belongs to no phase
    before = CpuSample.take(server.pgid)
    _run_loop(_drive(server, args, phase, rng))
    phase.cpu = CpuShares.between(before, CpuSample.take(server.pgid))
    phase.lines = _drain_lines(server)
    try:
        phase.status_after = server.model_status(MODEL)
    except ServerError as exc:
        phase.status_after = {"error": str(exc)}
    return phase


def _wait_for_workers(server: KetchServer, timeout_s: float) -> None:
    """Return once GET /models says all REPLICAS workers are ready (their lines may come after
    ``ketch: ready``)."""
    deadline = time.monotonic() + timeout_s
    while server.model_status(MODEL)["replicas"]["ready"] < REPLICAS:
        server.wait_for(WORKER_READY, deadline - time.monotonic())


def _measure(args: argparse.Namespace, models_file: Path) -> tuple[list[Phase], list[str]]:
    """Both phases on one server, and what went wrong while stopping it."""
    server = KetchServer(models_file)
    with ending_signals_unwind(), server:
        try:
            server.start(args.startup_timeout)
            _wait_for_workers(server, args.startup_timeout)
            baseline = _run_phase(server, args, "baseline", rng=None)
            kills = _run_phase(server, args, "kills", rng=random.Random(args.seed))
        finally:
            # Ending signals are ignored while the group stops, so none can break the stop off.
            _stop_early(server)
    return [baseline, kills], [f"ketch {warning}" for warning in server.stop_warnings]


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def _print_table(phases: Sequence[Phase]) -> None:
    columns = ("sent", "answered", "200", "wrong", "5xx", "other", "hung", "conn err")
    print(f"{'phase':<10}" + "".join(f"{c:>10}" for c in columns) + f"{'200 rate':>10}{'req/s':>9}")
    for phase in phases:
        t = phase.tally
        connection_errors = sum(t.connection_errors.values())
        counts = (t.sent, t.answered, t.ok, t.wrong, t.server_errors, t.other_errors, t.hung)
        counts_text = "".join(f"{n:>10}" for n in (*counts, connection_errors))
        print(f"{phase.name:<10}{counts_text}{t.ok_share:>10.2%}{t.ok / phase.duration_s:>9.1f}")


def _print_latencies(phases: Sequence[Phase]) -> None:
    for phase in phases:
        latencies = phase.tally.latencies_s
        if not latencies:
            print(f"{phase.name}: no 200s, no latencies")
            continue
        figures = ", ".join(
            f"{label} {_ms(percentile(latencies, q))}"
            for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))
        )
        print(f"{phase.name}: latency of the 200s (ms): {figures}, max {_ms(max(latencies))}")


def _counter(counts: Counter[Any]) -> str:
    return ", ".join(f"{key} x {n}" for key, n in sorted(counts.items())) or "none"


def _print_details(phase: Phase) -> None:
    t = phase.tally
    print(
        f"{phase.name}: non-200 answers: {_counter(t.statuses)}; "
        f"connection errors: {_counter(t.connection_errors)}"
    )
    if phase.kills is not None:
        k = phase.kills
        print(
            f"{phase.name}: {len(k.pids)} workers SIGKILLed; no worker to kill {k.no_worker} "
            f"times, GET /models failed {k.status_failures} times"
        )
    joined = sum(1 for line in phase.lines if WORKER_READY.match(line))
    lost = sum(1 for line in phase.lines if WORKER_LOST.match(line))
    print(f"{phase.name}: server printed {joined} workers ready, {lost} workers lost")
    for line in phase.lines:
        if " unhealthy: " in line or line.startswith("(the server"):
            print(f"{phase.name}: server printed: {line}")
    s = phase.status_after
    print(
        f"{phase.name}: GET /models after: state {s.get('state')}, replicas {s.get('replicas')}, "
        f"worker_exits {s.get('worker_exits')}, cold_starts {s.get('cold_starts')}, "
        f"last_error {s.get('last_error', s.get('error'))!r}"
    )
    if phase.cpu is not None:
        _print_cpu(phase.name, phase.cpu, killed=phase.kills is not None)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _print_cpu(name: str, cpu: CpuShares, killed: bool) -> None:
    client = _share(cpu.client)
    if killed:
        # A killed worker's CPU leaves the server's group with it (the group's total even
        # drops), so only the sum of server and other means anything in this phase.
        together = None if cpu.server is None or cpu.other is None else cpu.server + cpu.other
        print(
            f"{name}: CPU (% of one core): server and other together {_share(together)} (killed "
            f"workers take their CPU out of the server's group), client {client}"
        )
        return
    print(
        f"{name}: CPU (% of one core): server {_share(cpu.server)}, client {client}, "
        f"other {_share(cpu.other)}"
    )
    if (cpu.other or 0.0) > NOISY_OTHER_CPU:
        print(f"WARNING: other processes used {_share(cpu.other)} of a core during {name}")


def _print_verdict(baseline: Phase, kills: Phase) -> None:
    if baseline.tally.ok_share > 0:
        ratio = f"{kills.tally.ok_share / baseline.tally.ok_share:.3f}"
    else:
        ratio = "n/a (no 200s in the baseline)"
    print(f"200 rate (share of requests sent), kills / baseline: {ratio}")
    if baseline.tally.ok > 0:
        # Per second too: a share of 100% can hide answers that came slower.
        per_second = (kills.tally.ok / kills.duration_s) / (baseline.tally.ok / baseline.duration_s)
        print(f"200s per second, kills / baseline: {per_second:.3f}")
    t = kills.tally
    met = t.hung == 0 and t.unanswered == 0 and t.sent > 0 and t.ok_share >= TARGET_OK_SHARE
    print(f"target: 0 hung, 0 unanswered, >= {TARGET_OK_SHARE:.0%} 200")
    print(
        f"kills: {t.hung} hung, {t.unanswered} unanswered, {t.ok_share:.2%} 200: "
        f"{'met' if met else 'NOT met'}"
    )


def _report(args: argparse.Namespace, phases: Sequence[Phase]) -> None:
    print(
        f"chaos: {args.clients} clients on {MODEL!r} ({args.burn_ms:g} ms CPU per input, "
        f"max_batch_size=1, {REPLICAS} workers), {args.duration:g} s per phase, a worker "
        f"SIGKILLed every {args.kill_every:g} s in the kill phase, client timeout "
        f"{args.client_timeout:g} s"
    )
    _print_table(phases)
    _print_latencies(phases)
    for phase in phases:
        _print_details(phase)
    _print_verdict(phases[0], phases[1])


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=positive_float, default=60.0, help="seconds per phase")
    parser.add_argument(
        "--kill-every", type=positive_float, default=2.0, help="seconds between kills"
    )
    parser.add_argument("--clients", type=at_least(1), default=16, help="closed-loop clients")
    parser.add_argument(
        "--client-timeout", type=positive_float, default=30.0, help="per request, s"
    )
    parser.add_argument("--burn-ms", type=positive_float, default=5.0, help="CPU ms per input")
    parser.add_argument("--seed", type=int, default=1, help="for choosing the worker to kill")
    parser.add_argument(
        "--startup-timeout", type=positive_float, default=60.0, help="seconds to ready"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ketch-bench-chaos-") as directory:
        source = MODELS_SOURCE.format(burn_ms=args.burn_ms, replicas=REPLICAS)
        models_file = write_models(Path(directory), source)
        print("starting ketch ...", file=sys.stderr, flush=True)
        try:
            phases, warnings = _measure(args, models_file)
        except KeyboardInterrupt:
            print("interrupted; the server was stopped", file=sys.stderr)
            return 130
        except (ServerError, OSError) as exc:
            print(f"FAILED: {exc}")
            return 1
    _report(args, phases)
    for warning in warnings:
        print(f"WARNING: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
