"""Cold starts through ``ketch serve``: the trivial model's cycles, then the preload case's.

Each timed request goes to a pool at zero, on one keep-alive connection (:class:`Client`), once
the previous worker was scaled down and its process has exited; ``GET /models`` must say
``zero`` before it and count every cold start after. The preload case alternates ``heavy``
(forked from the forkserver) and ``heavy_preloaded`` (forked from its template).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cold_start_models import (
    BODY,
    EXPECTED_OUTPUT,
    HEAVY,
    HEAVY_MODELS,
    HEAVY_PRELOADED,
    MODEL,
    SCALED_DOWN,
    TEMPLATE_READY,
    scaled_down,
)
from cold_start_report import BenchmarkError, PreloadReport, Report
from keepalive import KeepAliveConnection
from ketch_server import KetchServer
from procstat import CpuSample, CpuShares
from server_process import ServerError, wait_gone

#: The pool wants zero workers ``idle_timeout_s`` after the last request and stops the worker
#: another ``idle_timeout_s`` later; the deadline is that plus this margin for a loaded machine.
SCALE_DOWN_MARGIN_S = 30.0
#: How long a worker that was told DISCONNECT may take to exit.
WORKER_EXIT_TIMEOUT_S = 10.0
#: A request includes a cold start; the server's own limit is 60 s.
REQUEST_TIMEOUT_S = 60.0


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


def measure_server(args: argparse.Namespace, models_file: Path, report: Report) -> None:
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


def measure_preload_server(args: argparse.Namespace, models_file: Path, report: Report) -> None:
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
        pid = int(server.wait_for(scaled_down(model), scale_down_timeout_s)["pid"])
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
