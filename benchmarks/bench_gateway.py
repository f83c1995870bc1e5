"""What ketch's gateway costs, against a bare Starlette app on the same Hypercorn settings.

In one run this starts ``ketch serve examples/quickstart.py`` and then
``benchmarks/baseline_app.py``, one at a time, each in its own process group; waits (with a
deadline) for its ``ketch: ready`` line; checks one request by hand; drives it with
``loadgen`` at each connection count; and stops it with SIGINT. It prints a table and the two
figures ketch aims for:

- throughput, ketch / baseline, at the highest connection count (default 64): at least 0.60;
- added median latency, ketch - baseline, at the lowest connection count (default 1): under 1 ms.

Run from anywhere: ``python benchmarks/bench_gateway.py --duration 5 [--json]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadgen import LoadResult, LoadSpec, run_load
from procstat import CpuSample, CpuShares
from report import finite
from server_process import ServerError, ServerProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
PREDICT_PATH = "/models/double/predict"
THROUGHPUT_TARGET = 0.60
ADDED_P50_TARGET_MS = 1.0
#: The first request may wait for ketch to start a worker (models scale to zero when idle).
PROBE_TIMEOUT_S = 60.0
#: CPU taken by unrelated processes during a run, in cores, above which figures are suspect.
NOISY_OTHER_CPU = 0.25


class BenchmarkError(Exception):
    """A target could not be measured; the message says why."""


@dataclass(frozen=True)
class Row:
    target: str
    result: LoadResult
    #: CPU over warm-up and window, in cores: the server's process group (gateway and
    #: workers), the load generator, and everything else on the machine.
    cpu: CpuShares


@dataclass
class TargetReport:
    name: str
    rows: list[Row] = field(default_factory=list)
    reply_keys: list[str] = field(default_factory=list)
    exit_code: int | None = None
    failure: str | None = None
    warnings: list[str] = field(default_factory=list)


def _probe(url: str, body: bytes) -> dict[str, Any]:
    """Send one request and return its JSON reply, so a broken route fails loudly up front."""
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise BenchmarkError(f"POST {url} answered {exc.code}: {detail}") from exc
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"POST {url} failed: {exc}") from exc
    if not isinstance(payload, dict):
        raise BenchmarkError(f"POST {url} answered {payload!r}, not a JSON object")
    return payload


def _ketch_command() -> list[str]:
    # Prefer the console script installed beside this interpreter, so both targets run on the
    # same Python; fall back to whatever `ketch` is on PATH.
    beside = Path(sys.executable).with_name("ketch")
    found = str(beside) if beside.exists() else shutil.which("ketch")
    if found is None:
        raise BenchmarkError("no `ketch` command found; install ketch with `pip install -e .`")
    return [found, "serve", "examples/quickstart.py", "--host", "127.0.0.1", "--port", "0"]


def _baseline_command() -> list[str]:
    script = Path(__file__).with_name("baseline_app.py")
    return [sys.executable, str(script), "--host", "127.0.0.1", "--port", "0"]


def _measure(
    name: str, command: list[str], counts: Sequence[int], args: argparse.Namespace
) -> TargetReport:
    report = TargetReport(name)
    server = ServerProcess(name, command, cwd=REPO_ROOT)
    try:
        with server:
            _drive(server, report, counts, args)
    except (BenchmarkError, ServerError, ConnectionError, RuntimeError, TimeoutError) as exc:
        report.failure = str(exc)
    report.exit_code, report.warnings = server.exit_code, server.stop_warnings
    return report


def _drive(
    server: ServerProcess, report: TargetReport, counts: Sequence[int], args: argparse.Namespace
) -> None:
    url = server.wait_ready(args.startup_timeout) + PREDICT_PATH
    report.reply_keys = sorted(_probe(url, args.body.encode()))
    for connections in counts:
        print(f"  {server.name}: {connections} connections ...", file=sys.stderr, flush=True)
        spec = LoadSpec(
            url=url,
            body=args.body.encode(),
            connections=connections,
            duration_s=args.duration,
            warmup_s=args.warmup,
            processes=args.processes,
        )
        before = CpuSample.take(server.pgid)
        result = run_load(spec)
        cpu = CpuShares.between(before, CpuSample.take(server.pgid))
        report.rows.append(Row(server.name, result, cpu))


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _print_table(rows: Sequence[Row]) -> None:
    header = (
        f"{'target':<10}{'connections':>12}{'req/s':>11}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'errors':>8}{'client CPU':>12}{'server CPU':>12}{'other CPU':>11}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        r = row.result
        print(
            f"{row.target:<10}{r.connections:>12}{r.requests_per_s:>11.1f}{r.p50_ms:>10.3f}"
            f"{r.p99_ms:>10.3f}{r.errors:>8}{_percent(row.cpu.client):>12}"
            f"{_percent(row.cpu.server):>12}{_percent(row.cpu.other):>11}"
        )
    print(
        "(CPU in % of one core over warm-up and run: client = load generator, server = its"
        " process group, other = the rest of the machine)"
    )


def _find(rows: Sequence[Row], target: str, connections: int) -> LoadResult | None:
    for row in rows:
        if row.target == target and row.result.connections == connections:
            return row.result
    return None


def _ratios(rows: Sequence[Row], counts: Sequence[int]) -> dict[str, Any]:
    busy, idle = max(counts), min(counts)
    ratios: dict[str, Any] = {"busy_connections": busy, "idle_connections": idle}
    ketch, baseline = _find(rows, "ketch", busy), _find(rows, "baseline", busy)
    if ketch and baseline and baseline.requests_per_s > 0:
        ratios["throughput_ratio"] = ketch.requests_per_s / baseline.requests_per_s
    ketch, baseline = _find(rows, "ketch", idle), _find(rows, "baseline", idle)
    if ketch and baseline:
        ratios["added_p50_ms"] = ketch.p50_ms - baseline.p50_ms
    return ratios


def _print_ratios(ratios: dict[str, Any]) -> None:
    if "throughput_ratio" in ratios:
        value = ratios["throughput_ratio"]
        verdict = "meets" if value >= THROUGHPUT_TARGET else "MISSES"
        print(
            f"throughput ketch/baseline at {ratios['busy_connections']} connections: "
            f"{value:.2f} ({verdict} the target >= {THROUGHPUT_TARGET:.2f})"
        )
    if "added_p50_ms" in ratios:
        value = ratios["added_p50_ms"]
        verdict = "meets" if value < ADDED_P50_TARGET_MS else "MISSES"
        print(
            f"added median latency ketch - baseline at {ratios['idle_connections']} "
            f"connection(s): {value:.3f} ms ({verdict} the target < {ADDED_P50_TARGET_MS:g} ms)"
        )


def _print_warnings(reports: Sequence[TargetReport], rows: Sequence[Row]) -> None:
    noisiest = max((row.cpu.other or 0.0 for row in rows), default=0.0)
    if noisiest > NOISY_OTHER_CPU:
        print(
            f"WARNING: other processes used up to {100 * noisiest:.0f}% of a core during the "
            "runs; the machine was not quiet, so these figures are unreliable"
        )
    shapes = {tuple(r.reply_keys) for r in reports if r.reply_keys}
    if len(shapes) > 1:
        print("WARNING: the targets answer with different JSON keys:", sorted(shapes))
    for report in reports:
        for warning in report.warnings:
            print(f"WARNING: {report.name} {warning}")
        if report.failure:
            print(f"FAILED: {report.name}: {report.failure}")


def _json_report(
    args: argparse.Namespace, reports: Sequence[TargetReport], ratios: dict[str, Any]
) -> str:
    results = [
        {
            "target": row.target,
            **asdict(row.result),
            "server_cpu_cores": row.cpu.server,
            "other_cpu_cores": row.cpu.other,
        }
        for report in reports
        for row in report.rows
    ]
    targets = {
        r.name: {"exit_code": r.exit_code, "failure": r.failure, "warnings": r.warnings}
        for r in reports
    }
    payload = {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "results": results,
        "ratios": ratios,
        "targets": targets,
    }
    return json.dumps(finite(payload))


def _parse_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 64,1, got {text!r}")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--connections", type=_parse_counts, default=[64, 1], help="e.g. 64,1")
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--body", default='{"input": 21}', help="request body")
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to ready")
    parser.add_argument("--json", action="store_true", help="also print results as JSON")
    args = parser.parse_args(argv)

    reports: list[TargetReport] = []
    for name in ("ketch", "baseline"):
        print(f"starting {name} ...", file=sys.stderr, flush=True)
        try:
            command = _ketch_command() if name == "ketch" else _baseline_command()
        except BenchmarkError as exc:
            reports.append(TargetReport(name, failure=str(exc)))
            continue
        reports.append(_measure(name, command, args.connections, args))

    rows = [row for report in reports for row in report.rows]
    _print_table(rows)
    ratios = _ratios(rows, args.connections)
    _print_ratios(ratios)
    _print_warnings(reports, rows)
    if args.json:
        print(_json_report(args, reports, ratios))
    failed = any(r.failure for r in reports) or any(
        row.result.errors or not row.result.requests for row in rows
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
