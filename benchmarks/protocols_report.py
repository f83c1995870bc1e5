"""The figures of ``bench_protocols.py``: the servers and runs it measured, their medians and
ratios over the rounds, printed as tables and as one JSON line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway_report import NOISY_OTHER_CPU, Spread, _percent, _ratio
from loadgen import LoadResult
from procstat import CpuShares
from pytriton_server import PYTRITON_VERSION
from report import finite

MODEL = "affine"
MAX_BATCH = 64
SERVERS = ("ketch", "triton")
#: A client that took this much of a core may have been what bounded the run.
BUSY_CLIENT_CPU = 0.85
FIGURES = (("requests_per_s", "req/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"))


@dataclass
class Server:
    """A server under test: where it listens, what it says it is, what went wrong."""

    name: str
    #: protocol -> ``HOST:PORT``, once the server is ready.
    addresses: dict[str, str] = field(default_factory=dict)
    pgid: int | None = None
    #: ``name version`` from its server metadata.
    identity: str | None = None
    failure: str | None = None
    #: protocol -> why that protocol was left out of the remaining rounds.
    protocol_failures: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    exit_code: int | None = None


@dataclass(frozen=True)
class Run:
    round: int
    server: str
    protocol: str
    result: LoadResult
    #: CPU over warm-up and window, in cores: the server's process group, this process (the
    #: client), and the rest of the machine (the idle other server included).
    cpu: CpuShares | None
    first_error: str | None


def _find(runs: Sequence[Run], number: int, server: str, protocol: str, c: int) -> Run | None:
    for run in runs:
        if (run.round, run.server, run.protocol, run.result.connections) == (
            number,
            server,
            protocol,
            c,
        ):
            return run
    return None


def _figure(run: Run | None, key: str) -> float | None:
    if run is None or not run.result.requests:
        return None
    value: float = getattr(run.result, key)
    return value


def _medians(runs: Sequence[Run], args: argparse.Namespace) -> dict[str, Any]:
    """server -> protocol -> concurrency -> figure -> Spread over the rounds."""
    rounds = range(1, args.rounds + 1)
    return {
        server: {
            protocol: {
                c: {
                    key: Spread.of(
                        [_figure(_find(runs, n, server, protocol, c), key) for n in rounds]
                    )
                    for key, _ in FIGURES
                }
                for c in args.concurrency
            }
            for protocol in args.protocols
        }
        for server in SERVERS
    }


def _ratios(runs: Sequence[Run], args: argparse.Namespace) -> dict[str, Any]:
    """protocol -> concurrency -> figure -> Spread of the per-round ratios ketch / Triton."""
    ratios: dict[str, Any] = {}
    for protocol in args.protocols:
        ratios[protocol] = {}
        for c in args.concurrency:
            ratios[protocol][c] = {}
            for key, _ in FIGURES:
                per_round = []
                for n in range(1, args.rounds + 1):
                    mine = _figure(_find(runs, n, "ketch", protocol, c), key)
                    theirs = _figure(_find(runs, n, "triton", protocol, c), key)
                    if mine is not None and theirs is not None:
                        per_round.append(_ratio(mine, theirs))
                ratios[protocol][c][key] = Spread.of(per_round)
    return ratios


def _number(value: float | None, key: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if key == "requests_per_s" else f"{value:.2f}"


def _spread_text(spread: Spread | None, key: str) -> str:
    if spread is None:
        return "n/a"
    low, high = _number(spread.low, key), _number(spread.high, key)
    return f"{_number(spread.median, key)} ({low}-{high})"


def _ratio_text(spread: Spread | None) -> str:
    if spread is None:
        return "n/a"
    return f"{spread.median:.2f}x ({spread.low:.2f}-{spread.high:.2f})"


def _print_runs(runs: Sequence[Run]) -> None:
    header = (
        f"{'round':<7}{'server':<8}{'protocol':<10}{'clients':>8}{'req/s':>10}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'errors':>8}{'client CPU':>12}{'server CPU':>12}{'other CPU':>11}"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        r = run.result
        cpu = run.cpu
        print(
            f"{run.round:<7}{run.server:<8}{run.protocol:<10}{r.connections:>8}"
            f"{r.requests_per_s:>10.1f}{r.p50_ms:>9.3f}{r.p99_ms:>9.3f}{r.errors:>8}"
            f"{_percent(r.client_cpu_cores):>12}{_percent(cpu.server if cpu else None):>12}"
            f"{_percent(cpu.other if cpu else None):>11}"
        )
    print(
        "(CPU in % of one core: client = this process over the window, server = its process"
        " group and other = the rest of the machine, both over warm-up and window)"
    )


def _print_medians(
    medians: dict[str, Any], ratios: dict[str, Any], args: argparse.Namespace
) -> None:
    labels = [label for _, label in FIGURES]
    header = f"{'protocol':<10}{'clients':>8}  {'server':<8}" + "".join(f"{x:>22}" for x in labels)
    print(f"medians over {args.rounds} rounds (range min-max)")
    print(header)
    print("-" * len(header))
    for protocol in args.protocols:
        for c in args.concurrency:
            for server in SERVERS:
                spreads = medians[server][protocol][c]
                cells = "".join(f"{_spread_text(spreads[key], key):>22}" for key, _ in FIGURES)
                print(f"{protocol:<10}{c:>8}  {server:<8}{cells}")
    print()
    print("ketch / Triton: median of the per-round ratios (range)")
    header = f"{'protocol':<10}{'clients':>8}" + "".join(f"{x:>22}" for x in labels)
    print(header)
    print("-" * len(header))
    for protocol in args.protocols:
        for c in args.concurrency:
            cells = "".join(f"{_ratio_text(ratios[protocol][c][key]):>22}" for key, _ in FIGURES)
            print(f"{protocol:<10}{c:>8}{cells}")
    print("(req/s above 1: ketch answers more per second; p50, p99 below 1: ketch is faster)")


def _print_warnings(servers: dict[str, Server], runs: Sequence[Run]) -> None:
    noisy = [run for run in runs if run.cpu and (run.cpu.other or 0.0) > NOISY_OTHER_CPU]
    if noisy:
        worst = max(run.cpu.other or 0.0 for run in noisy if run.cpu)
        print(
            f"WARNING: other processes used up to {100 * worst:.0f}% of a core in {len(noisy)} "
            f"of {len(runs)} runs (the idle server counts there too); figures are less reliable"
        )
    busy = [run for run in runs if run.result.client_cpu_cores > BUSY_CLIENT_CPU]
    for run in busy:
        print(
            f"WARNING: round {run.round}, {run.server} {run.protocol}, {run.result.connections} "
            f"clients: the client took {_percent(run.result.client_cpu_cores)} of a core, so it "
            "may have bounded the run"
        )
    for run in runs:
        if run.result.errors or not run.result.requests:
            print(
                f"ERRORS: round {run.round}, {run.server} {run.protocol}, "
                f"{run.result.connections} clients: {run.result.errors} errors, "
                f"{run.result.requests} answers; first: {run.first_error}"
            )
    for server in servers.values():
        for warning in server.warnings:
            print(f"WARNING: {server.name}: {warning}")
        if server.failure:
            print(f"FAILED: {server.name}: {server.failure}")
        for protocol, reason in server.protocol_failures.items():
            print(f"FAILED: {server.name} over {protocol}: {reason}")


def _spread_json(spread: Spread | None) -> dict[str, Any] | None:
    return None if spread is None else asdict(spread)


def _json_line(
    servers: dict[str, Server],
    runs: Sequence[Run],
    medians: dict[str, Any],
    ratios: dict[str, Any],
    args: argparse.Namespace,
) -> str:
    payload = {
        "benchmark": "protocols",
        "model": f"{MODEL}: float32[3] -> float32[2], max_batch_size {MAX_BATCH}, one-row requests",
        "pytriton_version": PYTRITON_VERSION,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "round_count": args.rounds,
        "concurrency": args.concurrency,
        "protocols": args.protocols,
        "runs": [
            {
                "round": run.round,
                "server": run.server,
                "protocol": run.protocol,
                **asdict(run.result),
                "server_cpu_cores": run.cpu.server if run.cpu else None,
                "other_cpu_cores": run.cpu.other if run.cpu else None,
                "first_error": run.first_error,
            }
            for run in runs
        ],
        "medians": {
            server: {
                protocol: {
                    str(c): {key: _spread_json(s) for key, s in figures.items()}
                    for c, figures in by_c.items()
                }
                for protocol, by_c in by_protocol.items()
            }
            for server, by_protocol in medians.items()
        },
        "ratios": {
            protocol: {
                str(c): {key: _spread_json(s) for key, s in figures.items()}
                for c, figures in by_c.items()
            }
            for protocol, by_c in ratios.items()
        },
        "servers": {
            s.name: {
                "identity": s.identity,
                "exit_code": s.exit_code,
                "failure": s.failure,
                "protocol_failures": s.protocol_failures,
                "warnings": s.warnings,
            }
            for s in servers.values()
        },
    }
    return json.dumps(finite(payload))


def print_report(servers: dict[str, Server], runs: Sequence[Run], args: argparse.Namespace) -> int:
    """Print the runs, the medians and the ratios (and the JSON line); return the exit status."""
    medians, ratios = _medians(runs, args), _ratios(runs, args)
    ketch, triton = servers["ketch"].identity, servers["triton"].identity
    print(
        f"{MODEL} (float32[3] -> float32[2], max batch {MAX_BATCH}), one-row requests, closed "
        f"loop: ketch ({ketch}) against Triton ({triton}, PyTriton {PYTRITON_VERSION}, CPU)"
    )
    _print_runs(runs)
    print()
    _print_medians(medians, ratios, args)
    _print_warnings(servers, runs)
    if args.json:
        print(_json_line(servers, runs, medians, ratios, args))
    failed = any(s.failure or s.protocol_failures for s in servers.values()) or any(
        run.result.errors or not run.result.requests for run in runs
    )
    return 1 if failed else 0
