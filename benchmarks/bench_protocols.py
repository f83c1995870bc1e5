"""ketch against a real Triton server, both speaking the Open Inference Protocol to tritonclient.

One small Python model, served two ways side by side and called the same way:

- ketch: ``ketch serve`` on a models file this writes, the model declared with its tensors
  (``TensorSpec``) and ``max_batch_size=64``, one worker (``min_replicas=max_replicas=1``);
  called over REST (``POST /v2/models/affine/infer``, ``tritonclient.http.aio``) and over
  gRPC (``inference.GRPCInferenceService`` on the port of its ``ketch: grpc listening on`` line,
  ``tritonclient.grpc.aio``);
- Triton: the Triton Inference Server PyTriton bundles (on CPU), started by
  ``pytriton_server.py`` in the virtualenv the Triton test caches (``--pytriton-python``),
  binding the same function with ``max_batch_size=64`` and Triton's dynamic batcher; called by
  the same clients over its HTTP and gRPC ports.

The model is ``pytriton_server.py``'s ``affine``: ``y = x @ W + b``, ``x`` float32[3] and ``y``
float32[2] per row, the same numpy line with the same ``W`` and ``b`` on both servers. It is so
small that the figures are the cost of each server's path (protocol, queue, batcher, the hop to
the Python process that runs the model), not of the model. Neither server waits to fill a
batch (``max_delay_ms=0``, ``max_queue_delay_microseconds=0``: both defaults).

Each run is closed-loop with one-row requests: ``C`` clients each keep exactly one request in
flight, for ``--warmup`` unmeasured seconds then ``--duration`` measured ones, at each count of
``--concurrency`` (1 and 64): requests per second, p50 and p99 latency of the requests that
completed in the window, errors. 1 client measures the latency of one request through the
whole path; 64 measure how much the server can push (throughput at C clients is C / latency).

The clients are tritonclient's asyncio ones on one event loop (uvloop), one client per run
(an aiohttp pool with a connection per request in flight; one gRPC channel multiplexing
them), because that measures the server rather than the client. 64 threads of the synchronous
clients cost about as much CPU per request, but a thread whose answer has arrived waits for
the GIL, up to the 5 ms switch interval, and that wait would land in the measured latency; on
one loop an answer waits only for the callbacks ahead of it. The load is the same code against
both servers, its CPU is printed per run (70-220 us a request, under 60% of a core at the rates
seen on 2 cores), and a run whose client took most of a core is flagged: there, the figure may
be the client's.

Both servers start together and stay up for the whole run. Then come ``--rounds`` interleaved
rounds (default 3), as in ``bench_gateway.py``: per protocol, ketch then Triton, the order
swapped every other round, each alone under load while the other sits idle, each turn starting
with one request whose answer is checked against numpy. The report takes medians over the
rounds: a table per protocol and concurrency, then the ratios **ketch / Triton**, each the
median of the per-round ratios with its range:

- req/s ratio above 1: ketch answers more requests per second than Triton;
- p50 and p99 ratios below 1: ketch answers faster than Triton.

Every wait has a deadline: each server's ready line (ketch's ``ketch: ready``, PyTriton's
``READY``), every request (30 s), the drain after each run. Both servers are stopped however the
run ends (normally, on an exception, Ctrl-C, SIGTERM or SIGHUP): ketch with SIGINT, Triton with
SIGTERM, each process group killed if it lingers. The exit status is non-zero when a server or
a protocol could not be measured or a run saw errors or no answers.

    python benchmarks/bench_protocols.py                                # 3 rounds: about 5 min
    python benchmarks/bench_protocols.py --duration 3 --warmup 1 --rounds 2 --json
    python benchmarks/bench_protocols.py --pytriton-python PATH --concurrency 1,16,64

Needs ``tritonclient[http,grpc]`` beside ketch, and a virtualenv with ``nvidia-pytriton``
(``tox -e triton`` builds the cached one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tritonclient.http as triton_http
from bench_gateway import _parse_counts
from gateway_run import _announce_final_stops, ending_signals_unwind
from ketch_server import KetchServer, write_models
from procstat import CpuSample, CpuShares
from protocols_load import PROTOCOLS, InferSpec, probe, run_infer_load
from protocols_report import MAX_BATCH, MODEL, SERVERS, Run, Server, print_report
from pytriton_server import (
    AFFINE_B,
    AFFINE_W,
    START_TIMEOUT_S,
    ServerStartError,
    cached_venv,
    run_server,
)
from report import at_least
from server_process import LISTENING_PREFIX, READY_LINE, ServerError

INPUT, OUTPUT = "x", "y"
#: The row every request sends.
ROW = (0.5, -1.25, 2.0)
GRPC_LISTENING_PREFIX = "ketch: grpc listening on "
KETCH_READY = re.compile(f"^{re.escape(READY_LINE)}$")
#: How long a metadata request may take.
METADATA_TIMEOUT_S = 30.0

KETCH_MODELS = """
import numpy as np

import ketch
from ketch import TensorSpec

W = np.array({w!r}, dtype=np.float32)
B = np.array({b!r}, dtype=np.float32)


@ketch.model(
    name="{model}",
    inputs=[TensorSpec("{input}", "float32", (3,))],
    outputs=[TensorSpec("{output}", "float32", (2,))],
    max_batch_size={max_batch},
    min_replicas=1,
    max_replicas=1,
)
def affine(xs: np.ndarray) -> np.ndarray:
    return xs @ W + B
"""


class BenchmarkError(Exception):
    """A server answered wrongly; the message says how."""


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument(
        "--concurrency", type=_parse_counts, default=[1, 64], help="closed-loop clients: 1,64"
    )
    parser.add_argument("--rounds", type=at_least(1), default=3, help="interleaved rounds (3)")
    parser.add_argument(
        "--protocols",
        type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
        default=list(PROTOCOLS),
        help="http,grpc",
    )
    parser.add_argument(
        "--pytriton-python",
        type=Path,
        default=cached_venv() / "bin" / "python",
        help="python of a virtualenv with nvidia-pytriton (default: the Triton test's)",
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=START_TIMEOUT_S, help="seconds to ready"
    )
    parser.add_argument("--json", action="store_true", help="also print one line of JSON")
    args = parser.parse_args(argv)
    if not args.protocols or set(args.protocols) - set(PROTOCOLS):
        parser.error(f"--protocols takes some of {','.join(PROTOCOLS)}")
    try:
        InferSpec("http", "", MODEL, INPUT, OUTPUT, ROW, 1, args.duration, args.warmup)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.pytriton_python.exists():
        parser.error(
            f"no {args.pytriton_python}: run `tox -e triton` (tests/frameworks/test_triton.py "
            "builds it) or make a virtualenv with `pip install nvidia-pytriton` and pass its python"
        )
    return args


def _expected() -> np.ndarray:
    weights, bias = np.array(AFFINE_W, np.float32), np.array(AFFINE_B, np.float32)
    return np.asarray([ROW], np.float32) @ weights + bias


def _start_ketch(server: KetchServer, timeout_s: float) -> dict[str, str]:
    """Wait for ``ketch: ready``; return its HTTP and gRPC ``HOST:PORT`` from the lines before."""
    seen: list[str] = []
    server.wait_for(KETCH_READY, timeout_s, seen)
    addresses = {}
    for line in seen:
        if line.startswith(LISTENING_PREFIX):
            server.base_url = line.removeprefix(LISTENING_PREFIX).strip().rstrip("/")
            addresses["http"] = server.base_url.removeprefix("http://")
        elif line.startswith(GRPC_LISTENING_PREFIX):
            addresses["grpc"] = line.removeprefix(GRPC_LISTENING_PREFIX).strip()
    if set(addresses) != set(PROTOCOLS):
        raise ServerError(f"ketch was ready without both listening lines: {seen}")
    return addresses


def _ketch_news(server: KetchServer) -> list[str]:
    """The lines ketch printed since the last look that say something went wrong."""
    news = []
    with contextlib.suppress(ServerError):  # it exited: the next turn's probe says so
        while (line := server.next_line(0.0)) is not None:
            if " lost worker " in line or " unhealthy: " in line:
                news.append(line)
    return news


def _child_group(script: Path) -> int | None:
    """The process group of this process's child running ``script`` (PyTriton's server is
    started in a session of its own, so its pid is its group's id); None without /proc."""
    me = os.getpid()
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_file.read_text()
            argv = stat_file.with_name("cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == me and str(script).encode() in argv:
            return int(stat_file.parent.name)
    return None


def _identity(address: str) -> str:
    client = triton_http.InferenceServerClient(
        address, connection_timeout=METADATA_TIMEOUT_S, network_timeout=METADATA_TIMEOUT_S
    )
    try:
        metadata = client.get_server_metadata()
    finally:
        client.close()
    return f"{metadata.get('name')} {metadata.get('version')}"


def _spec(server: Server, protocol: str, concurrency: int, args: argparse.Namespace) -> InferSpec:
    return InferSpec(
        protocol,
        server.addresses[protocol],
        MODEL,
        INPUT,
        OUTPUT,
        ROW,
        concurrency,
        args.duration,
        args.warmup,
    )


def _turn(server: Server, protocol: str, number: int, args: argparse.Namespace) -> list[Run]:
    """One server's turn on one protocol: a checked request, then a run at each concurrency.
    A failure leaves this server and protocol out of the remaining rounds."""
    runs: list[Run] = []
    if server.failure or protocol in server.protocol_failures:
        return runs
    try:
        answer = probe(_spec(server, protocol, 1, args))
        if answer.shape != _expected().shape or not np.allclose(answer, _expected(), atol=1e-5):
            raise BenchmarkError(f"answered {answer!r} where numpy says {_expected()!r}")
        for concurrency in args.concurrency:
            print(
                f"  round {number}/{args.rounds}, {server.name} {protocol}: "
                f"{concurrency} clients ...",
                file=sys.stderr,
                flush=True,
            )
            before = CpuSample.take(server.pgid) if server.pgid is not None else None
            outcome = run_infer_load(_spec(server, protocol, concurrency, args))
            cpu = None
            if before is not None and server.pgid is not None:
                cpu = CpuShares.between(before, CpuSample.take(server.pgid))
            runs.append(Run(number, server.name, protocol, outcome.load, cpu, outcome.first_error))
    except Exception as exc:  # whatever the client raised: this pair cannot be measured
        reason = f"round {number}: {type(exc).__name__}: {exc}"
        server.protocol_failures[protocol] = reason
        print(f"  {server.name} {protocol} left out: {reason}", file=sys.stderr, flush=True)
    return runs


def run_rounds(args: argparse.Namespace) -> tuple[dict[str, Server], list[Run]]:
    """Start both servers, run the rounds, and stop both however this ends."""
    servers = {name: Server(name) for name in SERVERS}
    ketch, triton = servers["ketch"], servers["triton"]
    runs: list[Run] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-protocols-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        folder = Path(tmp)
        (folder / "ketch").mkdir()
        (folder / "triton").mkdir()
        source = KETCH_MODELS.format(
            w=AFFINE_W, b=AFFINE_B, model=MODEL, input=INPUT, output=OUTPUT, max_batch=MAX_BATCH
        )
        print("starting ketch and Triton ...", file=sys.stderr, flush=True)
        ketch_process = KetchServer(write_models(folder / "ketch", source))
        stack.enter_context(ketch_process)
        # ketch starts up while this waits for PyTriton's READY.
        try:
            endpoints = stack.enter_context(
                run_server(
                    args.pytriton_python,
                    folder / "triton",
                    models=(MODEL,),
                    affine_max_batch_size=MAX_BATCH,
                    timeout_s=args.startup_timeout,
                )
            )
            triton.addresses = {"http": endpoints.http, "grpc": endpoints.grpc}
            triton.pgid = _child_group(folder / "triton" / "pytriton_server.py")
        except ServerStartError as exc:
            triton.failure = str(exc)
        # Registered after both servers, so it runs first on the way out: no Ctrl-C can break
        # off their stops.
        stack.callback(_announce_final_stops)
        try:
            ketch.addresses = _start_ketch(ketch_process, args.startup_timeout)
            ketch.pgid = ketch_process.pgid
        except ServerError as exc:
            ketch.failure = str(exc)
        for server in servers.values():
            if not server.failure:
                try:
                    server.identity = _identity(server.addresses["http"])
                except Exception as exc:
                    server.failure = f"server metadata: {type(exc).__name__}: {exc}"
        print(
            f"ketch: {ketch.identity or 'not started'}; Triton: {triton.identity or 'not started'}",
            file=sys.stderr,
            flush=True,
        )
        for number in range(1, args.rounds + 1):
            order = SERVERS if number % 2 else SERVERS[::-1]
            for protocol in args.protocols:
                for name in order:
                    runs.extend(_turn(servers[name], protocol, number, args))
                    if name == "ketch":
                        ketch.warnings.extend(_ketch_news(ketch_process))
    ketch.exit_code = ketch_process.exit_code
    ketch.warnings.extend(ketch_process.stop_warnings)
    return servers, runs


# -- the report ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    runs_count = 2 * len(args.protocols) * len(args.concurrency) * args.rounds
    print(
        f"{args.rounds} rounds, {runs_count} runs of {args.warmup:g} + {args.duration:g} s: "
        f"about {runs_count * (args.warmup + args.duration):.0f} s of load",
        file=sys.stderr,
        flush=True,
    )
    try:
        with ending_signals_unwind():
            servers, runs = run_rounds(args)
    except KeyboardInterrupt:
        print("interrupted; both servers were stopped", file=sys.stderr)
        return 130
    except ServerError as exc:  # ketch could not even be started
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    return print_report(servers, runs, args)


if __name__ == "__main__":
    sys.exit(main())
