"""The baselines outside ``ketch serve``, in fresh interpreters, once its server has stopped.

A ``python -m ketch.cli.main worker`` timed from its start to its READY on a ROUTER socket this
binds (against the trivial model's cold start), and the preload case's heavy imports timed
alone (against what preload saves).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq
from cold_start_models import HEAVY_IMPORTS, IMPORT_TIMER, MODEL
from cold_start_report import BenchmarkError, Report

from ketch.zmq_transport.protocol import Command, ProtocolError, decode, split_envelope

#: How long a fresh ``ketch worker`` process may take to send READY.
FRESH_READY_TIMEOUT_S = 60.0


def _import_ms() -> float:
    """Time :data:`HEAVY_IMPORTS` in a fresh interpreter that has imported what the
    forkserver holds."""
    command = [sys.executable, "-c", IMPORT_TIMER, *HEAVY_IMPORTS]
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=FRESH_READY_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(
            f"importing {', '.join(HEAVY_IMPORTS)} took over {FRESH_READY_TIMEOUT_S:g} s"
        ) from exc
    try:
        return float(done.stdout.strip())
    except ValueError:
        raise BenchmarkError(
            f"timing the imports of {', '.join(HEAVY_IMPORTS)} exited with code "
            f"{done.returncode}; its stderr:\n{done.stderr[-2000:]}"
        ) from None


def measure_imports(args: argparse.Namespace, report: Report) -> None:
    print(f"{args.fresh_runs} fresh interpreters importing ...", file=sys.stderr, flush=True)
    try:
        for _ in range(args.fresh_runs):
            report.preload.import_ms.append(_import_ms())
    except BenchmarkError as exc:
        report.failures.append(f"preload case: {exc}")


def _fresh_worker_ms(router: zmq.Socket[bytes], endpoint: str, models_file: Path) -> float:
    """Start ``python -m ketch.cli.main worker`` and time it until its READY reaches ``router``."""
    command = [
        sys.executable,
        "-m",
        "ketch.cli.main",
        "worker",
        f"{models_file.name}:{MODEL}",
        "--connect",
        endpoint,
    ]
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter_ns()
        process = subprocess.Popen(
            command,
            cwd=models_file.parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # one killpg stops it and anything it started
        )
        pidfd = os.pidfd_open(process.pid)
        try:
            poller = zmq.Poller()
            poller.register(router, zmq.POLLIN)
            poller.register(pidfd, zmq.POLLIN)  # readable once the process has exited
            deadline = time.monotonic() + FRESH_READY_TIMEOUT_S
            while (remaining := deadline - time.monotonic()) > 0:
                events = dict(poller.poll(math.ceil(remaining * 1000)))
                if router in events:
                    frames = router.recv_multipart()
                    arrived = time.perf_counter_ns()
                    try:
                        message = decode(split_envelope(frames)[1])
                    except ProtocolError:
                        continue
                    # Heartbeats of an earlier run's worker may still be in flight: skip them.
                    if message.command is Command.READY and message.header.get("pid") == (
                        process.pid
                    ):
                        return (arrived - started) / 1e6
                elif pidfd in events:
                    break
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace")[-2000:]
            code = process.poll()
            when = f"exited with code {code}" if code is not None else "still runs"
            raise BenchmarkError(
                f"`{' '.join(command)}` {when} without sending READY (waited at most "
                f"{FRESH_READY_TIMEOUT_S:g} s); its stderr:\n{tail}"
            )
        finally:
            os.close(pidfd)
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


def measure_fresh(args: argparse.Namespace, models_file: Path, report: Report) -> None:
    print(f"{args.fresh_runs} fresh interpreters ...", file=sys.stderr, flush=True)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = context.socket(zmq.ROUTER)
    try:
        router.bind("tcp://127.0.0.1:*")
        endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        for _ in range(args.fresh_runs):
            report.fresh_ms.append(_fresh_worker_ms(router, endpoint, models_file))
    except (BenchmarkError, OSError, zmq.ZMQError) as exc:
        report.failures.append(f"fresh interpreter: {exc}")
    finally:
        router.close(linger=0)
        context.term()
