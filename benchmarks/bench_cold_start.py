"""How long a request to a pool at zero waits for its answer, against a fresh interpreter.

A model declared with ``min_replicas=0`` (the default) has no worker process until a request
comes, and goes back to none ``idle_timeout_s`` after the last one. The first request after
that pays for starting a worker: the *cold start*. This benchmark writes a models file with a
trivial model (``@ketch.model(idle_timeout_s=0.3)`` doubling its inputs) to a temporary
directory, serves it with ``ketch serve``, and measures from the client's side, on one
keep-alive HTTP connection:

- **cold start to first answer**, N times (``--cycles``, default 20): wait for the pool's
  ``lost worker ... scaled down`` line and for that worker's process to exit, check ``GET
  /models`` says ``zero``, then time one ``POST /models/double/predict``;
- the **first cold start** after ``ketch: ready``, reported apart (it is also the first fork);
- the **warm** latency of the same request, ``--warm-requests`` (default 200) back to back;
- a **fresh interpreter** baseline, once the server has stopped: ``python -m ketch.cli.main worker
  models.py:double --connect ...`` against a ROUTER socket this script binds, timed from
  starting the process to its READY message; ``--fresh-runs`` (default 5) times.

Then the **preload** case: what ``@ketch.model(preload=True)`` buys for a model whose module is
slow to import. A second models file (so the trivial model's figures above stay what they
were) imports at module level the libraries in :data:`HEAVY_IMPORTS` (Hypercorn's asyncio
server, Starlette, and some standard library: about 150-220 ms, median about 200 ms, in a
fresh interpreter that has already imported ketch, numpy and pyzmq, as the forkserver has;
measured with ``time.perf_counter`` around the imports and ``python -X importtime`` on a
2-core machine) and declares two models with identical bodies, both with the same short
``idle_timeout_s``:

- ``heavy``: forked from the shared forkserver, so every worker imports the file, and pays
  for those imports, on every cold start;
- ``heavy_preloaded`` (``preload=True``): forked from the model's template, which imported the
  file once when the server started, so a worker starts with the imports done.

A second ``ketch serve`` on that file waits for ``ketch: model heavy_preloaded:1 template
ready ...``, makes one untimed cold start of each model, then runs ``--cycles`` cycles, each a
timed cold start of ``heavy`` and then one of ``heavy_preloaded``, each after the other
model's worker has been scaled down and has exited, and with ``GET /models`` saying the model
is at ``zero``. It prints the median and p90 of each, the ratio of the medians (preloaded /
not preloaded), and the template's resident memory from ``GET /models`` (what preload costs
while the pool is at zero). Once that server has stopped, the same imports are timed in
``--fresh-runs`` fresh interpreters (after importing ketch, numpy and pyzmq), to compare
with the difference of the two medians.

Targets: cold start to first answer, median, at most 50 ms (stretch: 25 ms).

Run from anywhere: ``python benchmarks/bench_cold_start.py --cycles 10 [--json]``; the
preload case's figures are in the JSON's ``preload`` object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from keepalive import KeepAliveConnection
from ketch_server import KetchServer, write_models
from procstat import CpuSample, CpuShares
from report import at_least, finite, percentile
from server_process import ServerError, wait_gone

from ketch.zmq_transport.protocol import Command, ProtocolError, decode, split_envelope

MODEL = "double"
BODY = b'{"input": 21}'
EXPECTED_OUTPUT = 42
MODELS_SOURCE = """
    import ketch


    @ketch.model(idle_timeout_s={idle_timeout_s!r})
    def double(xs):
        return [2 * x for x in xs]
"""
#: The preload case's models: the same body, workers forked from the forkserver (importing the
#: file each time) or from the model's template (which imported it once).
HEAVY = "heavy"
HEAVY_PRELOADED = "heavy_preloaded"
HEAVY_MODELS = (HEAVY, HEAVY_PRELOADED)
#: Imported at module level by the preload case's models file. Only ketch's own dependencies
#: and the standard library, and nothing the forkserver has already imported (asyncio, json):
#: about 200 ms (median; 150-220 ms) in a fresh interpreter that has imported ketch, numpy and
#: pyzmq, of which hypercorn.asyncio ~115 ms, starlette.applications ~50 ms, unittest.mock
#: ~15 ms, the rest ~15 ms together (``python -X importtime``, cumulative, in that order).
HEAVY_IMPORTS = (
    "hypercorn.asyncio",
    "starlette.applications",
    "unittest.mock",
    "email.mime.multipart",
    "http.server",
    "xml.etree.ElementTree",
    "decimal",
)
HEAVY_MODELS_SOURCE = """
    {imports}

    import ketch


    @ketch.model(idle_timeout_s={idle_timeout_s!r})
    def heavy(xs):
        return [2 * x for x in xs]


    @ketch.model(idle_timeout_s={idle_timeout_s!r}, preload=True)
    def heavy_preloaded(xs):
        return [2 * x for x in xs]
"""
#: Run in a fresh interpreter: import what the forkserver holds, then time the heavy imports.
IMPORT_TIMER = """
import importlib, sys, time
import numpy, zmq, ketch.worker.main
started = time.perf_counter()
for name in sys.argv[1:]:
    importlib.import_module(name)
print((time.perf_counter() - started) * 1000)
"""


def _scaled_down(model: str) -> re.Pattern[str]:
    """The pool manager letting a worker of ``model`` go (any other loss fails the run)."""
    return re.compile(
        rf"^ketch: model {re.escape(model)}:\S+ lost worker pid (?P<pid>\d+) .*: scaled down"
    )


SCALED_DOWN = _scaled_down(MODEL)
#: ``ketch: model heavy_preloaded:1 template ready: pid N, M MB with the model's imports ...``
TEMPLATE_READY = re.compile(
    rf"^ketch: model {HEAVY_PRELOADED}:\S+ template ready: pid (?P<pid>\d+), (?P<rss_mb>\d+) MB"
)
COLD_START_TARGET_MS = 50.0
COLD_START_STRETCH_MS = 25.0
#: The pool wants zero workers ``idle_timeout_s`` after the last request and stops the worker
#: another ``idle_timeout_s`` later; the deadline is that plus this margin for a loaded machine.
SCALE_DOWN_MARGIN_S = 30.0
#: How long a worker that was told DISCONNECT may take to exit.
WORKER_EXIT_TIMEOUT_S = 10.0
#: A request includes a cold start; the server's own limit is 60 s.
REQUEST_TIMEOUT_S = 60.0
#: How long a fresh ``ketch worker`` process may take to send READY.
FRESH_READY_TIMEOUT_S = 60.0
#: CPU taken by unrelated processes during the cycles, in cores, above which figures are suspect.
NOISY_OTHER_CPU = 0.25


class BenchmarkError(Exception):
    """A figure could not be measured; the message says why."""


@dataclass
class PreloadReport:
    """The preload case: cold starts of ``heavy`` and ``heavy_preloaded``, by model."""

    first_cold_ms: dict[str, float] = field(default_factory=dict)
    cold_ms: dict[str, list[float]] = field(
        default_factory=lambda: {model: [] for model in HEAVY_MODELS}
    )
    #: The template of ``heavy_preloaded`` as ``GET /models`` reports it after the cycles.
    template_pid: int | None = None
    template_rss_mb: int | None = None
    #: The heavy imports alone, timed in fresh interpreters after the server has stopped.
    import_ms: list[float] = field(default_factory=list)
    cold_starts_counted: dict[str, int | None] = field(default_factory=dict)
    cpu: CpuShares | None = None
    server_exit_code: int | None = None


@dataclass
class Report:
    cycles: int
    idle_timeout_s: float
    first_cold_ms: float | None = None
    cold_ms: list[float] = field(default_factory=list)
    warm_ms: list[float] = field(default_factory=list)
    fresh_ms: list[float] = field(default_factory=list)
    #: ``cold_starts`` from ``GET /models`` at the end: one per timed cold request, plus one.
    cold_starts_counted: int | None = None
    #: CPU over the cycles, in cores: the server's group, this script, everything else.
    cpu: CpuShares | None = None
    server_exit_code: int | None = None
    preload: PreloadReport = field(default_factory=PreloadReport)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Client:
    """One keep-alive connection that times ``POST /models/MODEL/predict`` (``double``)."""

    def __init__(self, base_url: str, model: str = MODEL) -> None:
        self._path = f"/models/{model}/predict"
        try:
            self._connection = KeepAliveConnection(base_url + self._path, REQUEST_TIMEOUT_S)
        except OSError as exc:
            raise BenchmarkError(f"cannot connect to {base_url}: {exc}") from exc
        self._request = self._connection.request_bytes(BODY)

    def timed_predict(self) -> float:
        """Milliseconds from sending the request to having read the whole answer."""
        started = time.perf_counter_ns()
        try:
            status, body, closes = self._connection.exchange(self._request)
            if closes:
                raise ValueError("the server closed the keep-alive connection")
        except (OSError, ValueError) as exc:
            raise BenchmarkError(f"POST {self._path} failed: {exc!r}") from exc
        elapsed_ms = (time.perf_counter_ns() - started) / 1e6
        try:
            output = json.loads(body).get("output")
        except (ValueError, AttributeError):
            output = None
        if status != 200 or output != EXPECTED_OUTPUT:
            raise BenchmarkError(
                f"POST {self._path} {BODY.decode()} answered {status} {body[:300]!r}; "
                f"expected 200 with output {EXPECTED_OUTPUT}"
            )
        return elapsed_ms

    def close(self) -> None:
        self._connection.close()


def _expect_pool(server: KetchServer, state: str, cold_starts: int, model: str = MODEL) -> None:
    status = server.model_status(model)
    seen = (status.get("state"), status.get("cold_starts"))
    if seen != (state, cold_starts):
        raise BenchmarkError(
            f"GET /models says {model} is {seen[0]!r} after {seen[1]} cold starts; expected "
            f"{state!r} after {cold_starts}: {status}"
        )


def _measure_server(args: argparse.Namespace, models_file: Path, report: Report) -> None:
    server = KetchServer(models_file)
    try:
        with server:
            client = Client(server.start(args.startup_timeout))
            try:
                _drive(server, client, args, report)
            finally:
                client.close()
    except (BenchmarkError, ServerError) as exc:
        report.failures.append(str(exc))
    report.server_exit_code = server.exit_code
    report.warnings.extend(f"ketch {warning}" for warning in server.stop_warnings)


def _drive(server: KetchServer, client: Client, args: argparse.Namespace, report: Report) -> None:
    _expect_pool(server, "zero", 0)
    print("first cold start, then warm requests ...", file=sys.stderr, flush=True)
    report.first_cold_ms = client.timed_predict()
    # Back to back, each well within idle_timeout_s of the last: the worker stays.
    report.warm_ms = [client.timed_predict() for _ in range(args.warm_requests)]
    _expect_pool(server, "ready", 1)

    print(f"{args.cycles} cold-start cycles ...", file=sys.stderr, flush=True)
    scale_down_timeout_s = 2 * args.idle_timeout + SCALE_DOWN_MARGIN_S
    before = CpuSample.take(server.pgid)
    for cycle in range(args.cycles):
        pid = int(server.wait_for(SCALED_DOWN, scale_down_timeout_s)["pid"])
        # The worker has been told DISCONNECT; let it exit so its teardown does not take CPU
        # from the next cold start.
        _wait_worker_gone(pid)
        _expect_pool(server, "zero", 1 + cycle)
        report.cold_ms.append(client.timed_predict())
    report.cpu = CpuShares.between(before, CpuSample.take(server.pgid))
    status = server.model_status(MODEL)
    report.cold_starts_counted = status.get("cold_starts")
    if report.cold_starts_counted != 1 + args.cycles:
        raise BenchmarkError(
            f"GET /models counts {report.cold_starts_counted} cold starts, expected "
            f"{1 + args.cycles}: some timed requests did not find the pool at zero"
        )


def _wait_worker_gone(pid: int) -> None:
    if wait_gone([pid], WORKER_EXIT_TIMEOUT_S):
        raise BenchmarkError(
            f"worker pid {pid} still runs {WORKER_EXIT_TIMEOUT_S:g} s after it was scaled down"
        )


def _measure_preload_server(args: argparse.Namespace, models_file: Path, report: Report) -> None:
    server = KetchServer(models_file)
    try:
        with server:
            base_url = server.start(args.startup_timeout)
            clients: dict[str, Client] = {}
            try:
                for model in HEAVY_MODELS:
                    clients[model] = Client(base_url, model)
                _drive_preload(server, clients, args, report.preload)
            finally:
                for client in clients.values():
                    client.close()
    except (BenchmarkError, ServerError) as exc:
        report.failures.append(f"preload case: {exc}")
    report.preload.server_exit_code = server.exit_code
    report.warnings.extend(f"ketch (preload case) {warning}" for warning in server.stop_warnings)


def _wait_template_ready(server: KetchServer, timeout_s: float) -> None:
    """Wait for ``heavy_preloaded``'s template to have imported the models file.

    ``GET /models`` changes the template's state and the server prints the ready line in the
    same step, so a template not ``ready`` there has its ready line still to come.
    """
    template = server.model_status(HEAVY_PRELOADED).get("template")
    if not (isinstance(template, dict) and template.get("state") == "ready"):
        server.wait_for(TEMPLATE_READY, timeout_s)


def _drive_preload(
    server: KetchServer,
    clients: dict[str, Client],
    args: argparse.Namespace,
    preload: PreloadReport,
) -> None:
    for model in HEAVY_MODELS:
        _expect_pool(server, "zero", 0, model)
    _wait_template_ready(server, args.startup_timeout)
    scale_down_timeout_s = 2 * args.idle_timeout + SCALE_DOWN_MARGIN_S

    def cold_start(model: str, cold_starts: int) -> float:
        """Time one request to ``model`` at zero, then wait until it is back at zero with no
        worker process left, so the next cold start (of either model) runs alone."""
        _expect_pool(server, "zero", cold_starts, model)
        elapsed_ms = clients[model].timed_predict()
        pid = int(server.wait_for(_scaled_down(model), scale_down_timeout_s)["pid"])
        _wait_worker_gone(pid)
        return elapsed_ms

    print("preload case: first cold starts ...", file=sys.stderr, flush=True)
    for model in HEAVY_MODELS:
        preload.first_cold_ms[model] = cold_start(model, 0)
    print(
        f"preload case: {args.cycles} cold-start cycles of {' and '.join(HEAVY_MODELS)} ...",
        file=sys.stderr,
        flush=True,
    )
    before = CpuSample.take(server.pgid)
    for cycle in range(args.cycles):
        for model in HEAVY_MODELS:
            preload.cold_ms[model].append(cold_start(model, 1 + cycle))
    preload.cpu = CpuShares.between(before, CpuSample.take(server.pgid))

    for model in HEAVY_MODELS:
        status = server.model_status(model)
        counted = preload.cold_starts_counted[model] = status.get("cold_starts")
        if counted != 1 + args.cycles:
            raise BenchmarkError(
                f"GET /models counts {counted} cold starts of {model}, expected "
                f"{1 + args.cycles}: some timed requests did not find the pool at zero"
            )
        template = status.get("template")
        if model == HEAVY and template is not None:
            raise BenchmarkError(f"GET /models shows a template for {HEAVY}: {status}")
        if model == HEAVY_PRELOADED:
            if not (isinstance(template, dict) and template.get("state") == "ready"):
                raise BenchmarkError(
                    f"GET /models shows no ready template for {HEAVY_PRELOADED}: {status}"
                )
            preload.template_pid = template.get("pid")
            preload.template_rss_mb = template.get("rss_mb")


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


def _measure_imports(args: argparse.Namespace, report: Report) -> None:
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


def _measure_fresh(args: argparse.Namespace, models_file: Path, report: Report) -> None:
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


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _figures(report: Report) -> dict[str, Any]:
    cold, warm, fresh = _median(report.cold_ms), _median(report.warm_ms), _median(report.fresh_ms)
    return {
        "cold_median_ms": cold,
        "cold_p90_ms": percentile(report.cold_ms, 0.90),
        "first_cold_ms": report.first_cold_ms if report.first_cold_ms is not None else math.nan,
        "warm_median_ms": warm,
        "fresh_interpreter_median_ms": fresh,
        "cold_over_fresh": cold / fresh if fresh > 0 else math.nan,
        "cold_minus_warm_ms": cold - warm,
    }


def _preload_figures(preload: PreloadReport) -> dict[str, Any]:
    heavy = _median(preload.cold_ms[HEAVY])
    preloaded = _median(preload.cold_ms[HEAVY_PRELOADED])
    return {
        "heavy_cold_median_ms": heavy,
        "heavy_cold_p90_ms": percentile(preload.cold_ms[HEAVY], 0.90),
        "heavy_preloaded_cold_median_ms": preloaded,
        "heavy_preloaded_cold_p90_ms": percentile(preload.cold_ms[HEAVY_PRELOADED], 0.90),
        "preloaded_over_not_preloaded": preloaded / heavy if heavy > 0 else math.nan,
        "not_preloaded_minus_preloaded_ms": heavy - preloaded,
        "import_median_ms": _median(preload.import_ms),
        "template_rss_mb": preload.template_rss_mb,
    }


def _print_table(report: Report) -> None:
    preload = report.preload
    rows = [
        ("cold start to first answer", report.cold_ms),
        (
            "first cold start after `ketch: ready`",
            [] if report.first_cold_ms is None else [report.first_cold_ms],
        ),
        ("warm request", report.warm_ms),
        ("fresh interpreter to READY", report.fresh_ms),
        (f"cold start, {HEAVY} (no preload)", preload.cold_ms[HEAVY]),
        (f"cold start, {HEAVY_PRELOADED} (template)", preload.cold_ms[HEAVY_PRELOADED]),
        ("heavy imports in a fresh interpreter", preload.import_ms),
    ]
    header = f"{'figure':<40}{'n':>5}{'median ms':>11}{'p90 ms':>10}{'min ms':>10}{'max ms':>10}"
    print(header)
    print("-" * len(header))
    for name, values in rows:
        if not values:
            print(f"{name:<40}{0:>5}{'-':>11}{'-':>10}{'-':>10}{'-':>10}")
            continue
        print(
            f"{name:<40}{len(values):>5}{_median(values):>11.2f}"
            f"{percentile(values, 0.90):>10.2f}{min(values):>10.2f}{max(values):>10.2f}"
        )


def _print_figures(figures: dict[str, Any], report: Report) -> None:
    cold = figures["cold_median_ms"]
    if math.isfinite(cold):
        verdict = "meets" if cold <= COLD_START_TARGET_MS else "MISSES"
        stretch = "meets" if cold <= COLD_START_STRETCH_MS else "misses"
        print(
            f"cold start to first answer: median {cold:.2f} ms, p90 "
            f"{figures['cold_p90_ms']:.2f} ms over {len(report.cold_ms)} cycles ({verdict} the "
            f"target <= {COLD_START_TARGET_MS:g} ms; {stretch} the stretch <= "
            f"{COLD_START_STRETCH_MS:g} ms)"
        )
    if math.isfinite(figures["warm_median_ms"]) and math.isfinite(cold):
        print(
            f"warm median {figures['warm_median_ms']:.2f} ms: starting the worker adds "
            f"{figures['cold_minus_warm_ms']:.2f} ms"
        )
    if math.isfinite(figures["cold_over_fresh"]):
        print(
            f"cold start / fresh interpreter (medians): {cold:.2f} / "
            f"{figures['fresh_interpreter_median_ms']:.2f} ms = {figures['cold_over_fresh']:.3f}"
        )


def _print_preload(figures: dict[str, Any], preload: PreloadReport) -> None:
    for model, how in ((HEAVY, "forkserver"), (HEAVY_PRELOADED, "template")):
        median = figures[f"{model}_cold_median_ms"]
        if math.isfinite(median):
            print(
                f"preload: {model} ({how}) cold start to first answer: median {median:.2f} ms, "
                f"p90 {figures[f'{model}_cold_p90_ms']:.2f} ms over "
                f"{len(preload.cold_ms[model])} cycles"
            )
    ratio = figures["preloaded_over_not_preloaded"]
    if math.isfinite(ratio):
        print(
            f"preload: preloaded / not preloaded (medians): "
            f"{figures['heavy_preloaded_cold_median_ms']:.2f} / "
            f"{figures['heavy_cold_median_ms']:.2f} ms = {ratio:.3f}; preload saves "
            f"{figures['not_preloaded_minus_preloaded_ms']:.2f} ms, the imports alone take "
            f"{figures['import_median_ms']:.2f} ms in a fresh interpreter"
        )
    if preload.template_rss_mb is not None:
        print(
            f"preload: the template of {HEAVY_PRELOADED} (pid {preload.template_pid}) holds "
            f"{preload.template_rss_mb} MB of resident memory while the pool is at zero"
        )


def _noisy(cpu: CpuShares | None, during: str) -> None:
    if cpu is not None and (cpu.other or 0.0) > NOISY_OTHER_CPU:
        print(
            f"WARNING: other processes used {100 * (cpu.other or 0.0):.0f}% of a core "
            f"during the {during}; the machine was not quiet, so these figures are unreliable"
        )


def _print_warnings(report: Report) -> None:
    _noisy(report.cpu, "cycles")
    _noisy(report.preload.cpu, "preload cycles")
    for warning in report.warnings:
        print(f"WARNING: {warning}")
    for failure in report.failures:
        print(f"FAILED: {failure}")


def _json_report(report: Report, figures: dict[str, Any], preload_figures: dict[str, Any]) -> str:
    preload = report.preload
    payload = {
        "cycles": report.cycles,
        "idle_timeout_s": report.idle_timeout_s,
        **figures,
        "targets_ms": {"cold_median": COLD_START_TARGET_MS, "stretch": COLD_START_STRETCH_MS},
        "cold_ms": report.cold_ms,
        "fresh_interpreter_ms": report.fresh_ms,
        "cold_starts_counted": report.cold_starts_counted,
        "server_cpu_cores": report.cpu.server if report.cpu else None,
        "other_cpu_cores": report.cpu.other if report.cpu else None,
        "server_exit_code": report.server_exit_code,
        "preload": {
            "heavy_imports": list(HEAVY_IMPORTS),
            **preload_figures,
            "template_pid": preload.template_pid,
            "first_cold_ms": preload.first_cold_ms,
            "cold_ms": preload.cold_ms,
            "import_ms": preload.import_ms,
            "cold_starts_counted": preload.cold_starts_counted,
            "server_cpu_cores": preload.cpu.server if preload.cpu else None,
            "other_cpu_cores": preload.cpu.other if preload.cpu else None,
            "server_exit_code": preload.server_exit_code,
        },
        "failures": report.failures,
        "warnings": report.warnings,
    }
    return json.dumps(finite(payload))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cycles", type=at_least(1), default=20, help="timed cold starts")
    parser.add_argument("--warm-requests", type=at_least(1), default=200, help="timed warm")
    parser.add_argument("--fresh-runs", type=at_least(1), default=5, help="fresh interpreters")
    parser.add_argument(
        "--idle-timeout", type=float, default=0.3, help="the model's idle_timeout_s"
    )
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to ready")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    if not args.idle_timeout > 0:
        parser.error(f"--idle-timeout must be > 0 s, got {args.idle_timeout}")

    report = Report(args.cycles, args.idle_timeout)
    with tempfile.TemporaryDirectory(prefix="ketch-bench-cold-") as directory:
        models_file = write_models(
            Path(directory), MODELS_SOURCE.format(idle_timeout_s=args.idle_timeout)
        )
        print("starting ketch ...", file=sys.stderr, flush=True)
        _measure_server(args, models_file, report)
        # After the server has stopped, so the two do not compete for the two cores.
        _measure_fresh(args, models_file, report)

        # The preload case serves a file of its own: were the heavy imports in the file above,
        # every worker of `double` would pay for them too.
        heavy_directory = Path(directory) / "preload"
        heavy_directory.mkdir()
        heavy_file = write_models(
            heavy_directory,
            HEAVY_MODELS_SOURCE.format(
                imports="\n    ".join(f"import {name}" for name in HEAVY_IMPORTS),
                idle_timeout_s=args.idle_timeout,
            ),
        )
        print("preload case: starting ketch ...", file=sys.stderr, flush=True)
        _measure_preload_server(args, heavy_file, report)
        _measure_imports(args, report)

    figures = _figures(report)
    preload_figures = _preload_figures(report.preload)
    _print_table(report)
    _print_figures(figures, report)
    _print_preload(preload_figures, report.preload)
    _print_warnings(report)
    if args.json:
        print(_json_report(report, figures, preload_figures))
    measured = report.cold_ms and report.fresh_ms and report.warm_ms
    preload_measured = all(report.preload.cold_ms.values()) and report.preload.import_ms
    return 1 if report.failures or not measured or not preload_measured else 0


if __name__ == "__main__":
    sys.exit(main())
