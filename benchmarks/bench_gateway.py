"""What ketch's gateway costs, against a bare Starlette app on the same Hypercorn settings.

This starts ``ketch serve examples/quickstart.py`` and ``benchmarks/baseline_app.py``, each in
its own process group, waits (with a deadline) for each one's ``ketch: ready`` line, and keeps
both up for the whole run. Then it runs ``--rounds`` interleaved rounds (default 5): ketch,
baseline, ketch, baseline, ... In a server's turn it alone receives load while the other sits
idle: one request by hand (which also waits out a worker's cold start), then ``loadgen`` at
each connection count. A single run of each swings by a third between runs on a shared
machine; alternating spreads slow changes in the machine's speed over both servers, instead of
handing them all to whichever ran second, and the median of the rounds shrugs off a bad one.

Each round gives three figures; the run prints them round by round, their median and their
range (min-max), and judges each median against its target:

- throughput, ketch / baseline, at the highest connection count (default 64): at least 0.80;
- p99 latency, ketch / baseline, at the highest connection count: at most 2x;
- added median latency, ketch p50 - baseline p50, at the lowest count (default 1): at most
  0.30 ms.

A missed target prints ``NOT met`` and leaves the exit status alone: that is non-zero when a
server could not be measured, or any run saw errors or no answers. Both servers are stopped
(SIGINT, then their process group killed) however the run ends: normally, on an exception, on
Ctrl-C, SIGTERM or SIGHUP.

With ``--gateways 1,2`` ketch is measured as one gateway process and as ``ketch serve
--gateways 2`` (two processes on one port, sharing the worker), in the same rounds; the
report adds each count's throughput at the highest connection count and its ratio to one
gateway's, round by round and their median.

Run from anywhere: ``python benchmarks/bench_gateway.py --duration 5 --rounds 5 [--json]``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence

from gateway_report import gateways_target, print_gateways, print_report
from gateway_run import (
    Target,
    baseline_command,
    ending_signals_unwind,
    ketch_command,
    record_stops,
    run_rounds,
)
from loadgen import LoadSpec
from report import at_least


def _parse_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 64,1, got {text!r}")
    return counts


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--connections", type=_parse_counts, default=[64, 1], help="e.g. 64,1")
    parser.add_argument(
        "--rounds", type=at_least(1), default=5, help="interleaved rounds: ketch, baseline, ..."
    )
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--body", default='{"input": 21}', help="request body")
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to ready")
    parser.add_argument("--json", action="store_true", help="also print results as JSON")
    parser.add_argument(
        "--gateways",
        type=_parse_counts,
        default=[1],
        help="ketch's gateway processes to measure, e.g. 1,2 (ketch serve --gateways N)",
    )
    args = parser.parse_args(argv)
    try:
        # Checked before any server starts, by the same rules the load generator applies.
        LoadSpec(
            url="http://127.0.0.1/",
            body=b"",
            duration_s=args.duration,
            warmup_s=args.warmup,
            processes=args.processes,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _announce(args: argparse.Namespace) -> None:
    runs = 2 * args.rounds * len(args.connections)
    print(
        f"{args.rounds} rounds, {runs} runs of {args.warmup:g} + {args.duration:g} s: "
        f"about {runs * (args.warmup + args.duration):.0f} s of load",
        file=sys.stderr,
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    targets = [Target("ketch", ketch_command)]
    targets += [
        Target(gateways_target(n), functools.partial(ketch_command, n))
        for n in args.gateways
        if n > 1
    ]
    targets.append(Target("baseline", baseline_command))
    _announce(args)
    try:
        with ending_signals_unwind():
            run_rounds(targets, args)
    except KeyboardInterrupt:
        print("interrupted; both servers were stopped", file=sys.stderr)
        return 130
    record_stops(targets)
    status = print_report(targets, args)
    print_gateways(targets, args)
    return status


if __name__ == "__main__":
    sys.exit(main())
