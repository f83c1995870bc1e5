"""Driving bench_gateway.py: both servers up, interleaved rounds of load, and the signals.

Each server (ketch and the baseline) is a :class:`Target`, started in its own process group and
kept up for the whole run; in its turn of a round it gets a probe, then a ``loadgen`` run at each
connection count, each a :class:`Row`. A server that fails is stopped and left out of the rounds
that remain. SIGTERM and SIGHUP unwind like Ctrl-C, so both servers are stopped however the run
ends, and no ending signal can break off a stop half-way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeAlias

from ketch_server import ketch_executable
from loadgen import LoadResult, LoadSpec, run_load
from procstat import CpuSample, CpuShares
from server_process import ServerError, ServerProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
PREDICT_PATH = "/models/double/predict"
#: The first request may wait for ketch to start a worker (models scale to zero when idle).
PROBE_TIMEOUT_S = 60.0
#: Signals that end a run early; each must still stop both servers.
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: What signal.signal() accepts and returns (None: a handler not installed from Python).
SignalHandler: TypeAlias = Callable[[int, FrameType | None], Any] | int | None


class BenchmarkError(Exception):
    """A target could not be measured; the message says why."""


#: What makes one server unmeasurable (it is then left out of the remaining rounds), as
#: opposed to a bug in this script, which should end the run with its traceback.
MEASUREMENT_ERRORS = (BenchmarkError, ServerError, ConnectionError, RuntimeError, TimeoutError)


@dataclass(frozen=True)
class Row:
    round: int
    target: str
    result: LoadResult
    #: CPU over warm-up and window, in cores: the server's process group (gateway and
    #: workers), the load generator, and everything else on the machine.
    cpu: CpuShares


@dataclass
class Target:
    """A server under test, kept up for the whole run, and what was measured on it."""

    name: str
    command: Callable[[], list[str]]
    server: ServerProcess | None = None
    #: The predict URL, once the server is ready; None again if it fails.
    url: str | None = None
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


def ketch_command(gateways: int = 1) -> list[str]:
    # The console script installed beside this interpreter, so both targets run on the same
    # Python, else whatever `ketch` is on PATH (a ServerError when there is none).
    found = ketch_executable()
    return [
        found,
        "serve",
        "examples/quickstart.py",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--grpc-port",
        "0",
        *(["--gateways", str(gateways), "--broker", "tcp://127.0.0.1:*"] if gateways > 1 else []),
    ]


def baseline_command() -> list[str]:
    script = Path(__file__).with_name("baseline_app.py")
    return [sys.executable, str(script), "--host", "127.0.0.1", "--port", "0"]


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _restore_handlers(saved: dict[signal.Signals, SignalHandler]) -> None:
    for signum, handler in saved.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def ending_signals_unwind() -> Iterator[None]:
    """Make SIGTERM and SIGHUP raise SystemExit inside the block, as Ctrl-C raises
    KeyboardInterrupt: by default they end Python without running the code that stops the
    servers. The handlers of all ending signals are restored on the way out."""
    saved = {signum: signal.getsignal(signum) for signum in ENDING_SIGNALS}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    try:
        yield
    finally:
        _restore_handlers(saved)


def _ignore_ending_signals() -> dict[signal.Signals, SignalHandler]:
    """Ignore Ctrl-C and termination, and return the handlers this replaced.

    Done while a server is being stopped: a signal that broke off its stop half-way would leave
    its process group running. Each stop has deadlines of its own (SIGINT, then SIGKILL of the
    group), so ignoring the signals cannot hang the run.
    """
    return {signum: signal.signal(signum, signal.SIG_IGN) for signum in ENDING_SIGNALS}


def _stop_early(server: ServerProcess) -> None:
    saved = _ignore_ending_signals()
    try:
        server.stop()  # idempotent: the exit stack's stop at the end then does nothing
    finally:
        _restore_handlers(saved)


def _announce_final_stops() -> None:
    # Not restored here: main's ending_signals_unwind does that once both servers are stopped.
    _ignore_ending_signals()
    print("stopping the servers ...", file=sys.stderr, flush=True)


def _launch(target: Target, servers: contextlib.ExitStack) -> None:
    """Start the target's server; ``servers`` stops it however the run ends."""
    print(f"starting {target.name} ...", file=sys.stderr, flush=True)
    try:
        command = target.command()
        target.server = servers.enter_context(ServerProcess(target.name, command, REPO_ROOT))
    except (BenchmarkError, ServerError) as exc:
        target.failure = str(exc)


def _give_up(target: Target, reason: str) -> None:
    """Leave the target out of the remaining rounds, and stop its server now rather than at
    the end, so that a broken server does not run beside the other one's load."""
    target.failure, target.url = reason, None
    if target.server is not None:
        _stop_early(target.server)


def _await_ready(target: Target, timeout_s: float) -> None:
    if target.server is None:
        return
    try:
        target.url = target.server.wait_ready(timeout_s) + PREDICT_PATH
    except ServerError as exc:
        _give_up(target, str(exc))


def _measure_load(
    server: ServerProcess, url: str, connections: int, number: int, args: argparse.Namespace
) -> Row:
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
    return Row(number, server.name, result, cpu)


def _run_turn(target: Target, number: int, args: argparse.Namespace) -> None:
    """Give the target its turn of round ``number``: a probe, then the load at each count."""
    server, url = target.server, target.url
    if server is None or url is None:
        return
    try:
        # Every round, not only the first: ketch's worker may have scaled to zero while the
        # other server had the load, and the probe, not a measured warm-up, should wait for it.
        target.reply_keys = sorted(_probe(url, args.body.encode()))
        for connections in args.connections:
            print(
                f"  round {number}/{args.rounds}, {target.name}: {connections} connections ...",
                file=sys.stderr,
                flush=True,
            )
            target.rows.append(_measure_load(server, url, connections, number, args))
    except MEASUREMENT_ERRORS as exc:
        _give_up(target, f"round {number}: {exc}")


def run_rounds(targets: Sequence[Target], args: argparse.Namespace) -> None:
    """Start every server, run the rounds, and stop every server however this ends."""
    with contextlib.ExitStack() as servers:
        for target in targets:
            _launch(target, servers)
        # Registered after the servers, so it runs before their stops on the way out.
        servers.callback(_announce_final_stops)
        # Both were started above, so they come up side by side; only now wait for them.
        for target in targets:
            _await_ready(target, args.startup_timeout)
        for number in range(1, args.rounds + 1):
            for target in targets:
                _run_turn(target, number, args)


def record_stops(targets: Sequence[Target]) -> None:
    for target in targets:
        if target.server is not None:
            target.exit_code = target.server.exit_code
            target.warnings = target.server.stop_warnings
