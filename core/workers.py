"""Local worker processes: discovering the served file's models and running their workers.

Processes come from ``multiprocess``'s forkserver, whose server has ketch, numpy and pyzmq
imported once: each worker is a fork of it, so it skips those imports and never inherits the
gateway's event loop, threads or sockets (which a plain fork would copy).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import multiprocess

from ketch.errors import TargetLoadError
from ketch.loader import Target, find_model, load_models
from ketch.models import ModelSpec
from ketch.runtimes.python import make_predict
from ketch.zmq_transport import worker
from ketch.zmq_transport.liveness import Heartbeat

log = logging.getLogger("ketch.workers")

#: Restart delays after a worker exits: doubled per quick exit, reset after a stable run.
RESTART_BACKOFF_S = (0.1, 10.0)
STABLE_RUN_S = 10.0


def _context() -> Any:
    context = multiprocess.get_context("forkserver")
    context.set_forkserver_preload(["ketch.workers"])
    return context


def run_worker(target: str, version: str | None, options: worker.WorkerOptions) -> None:
    """Worker process body: load the model named by ``target`` and serve it."""
    if not options.rejoin:
        # Started by `ketch serve`: Ctrl-C reaches the whole process group, and the gateway
        # alone decides when its workers stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    model = find_model(Target.parse(target), version)
    worker.serve(model.spec, make_predict(model), options)


def _discover_in_child(source: str, conn: Any) -> None:
    try:
        specs = [m.spec.to_dict() for m in load_models(Target(source))]
        conn.send(("ok", specs))
    except BaseException as exc:
        detail = str(exc) if isinstance(exc, TargetLoadError) else traceback.format_exc()
        conn.send(("error", detail))
    finally:
        conn.close()


def discover(source: str, timeout_s: float = 120.0) -> list[ModelSpec]:
    """The models ``source`` defines, read by importing it in a throw-away process."""
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_discover_in_child, args=(source, sender), name="ketch-discover", daemon=True
    )
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise TargetLoadError(f"importing {source!r} took more than {timeout_s:.0f} s")
        try:
            status, payload = receiver.recv()
        except EOFError:
            process.join(5)
            raise TargetLoadError(
                f"importing {source!r} killed the process (exit code {process.exitcode})"
            ) from None
    finally:
        receiver.close()
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
    if status != "ok":
        raise TargetLoadError(f"cannot load {source!r}:\n{payload}")
    return [ModelSpec.from_dict(spec) for spec in payload]


@dataclass(frozen=True, slots=True)
class ProcessEvents:
    """Where :class:`LocalWorkers` reports process starts and exits (the dispatcher)."""

    started: Callable[[ModelSpec, int], None]
    exited: Callable[[ModelSpec, int, str], None]


class LocalWorkers:
    """Keeps ``replicas`` worker processes per model version running, restarting with backoff.

    :param source: the served file or module.
    :param broker: endpoint the workers connect to.
    :param heartbeat: heartbeat settings shared with the broker.
    :param events: receives starts and exits, so a dead worker is dropped at once rather than
        after missed heartbeats.
    """

    def __init__(
        self, source: str, broker: str, heartbeat: Heartbeat, events: ProcessEvents
    ) -> None:
        self._source = source
        self._options = worker.WorkerOptions(broker=broker, heartbeat=heartbeat)
        self._events = events
        self._context = _context()
        self._processes: dict[int, tuple[ModelSpec, Any, float]] = {}
        self._backoff: dict[tuple[str, str], float] = {}
        self._restarts: dict[int, asyncio.TimerHandle] = {}
        self._restart_tokens = itertools.count()
        self._stopping = False
        self._all_exited: asyncio.Event | None = None

    def start(self, spec: ModelSpec, replicas: int) -> None:
        for _ in range(replicas):
            self._spawn(spec)

    def _spawn(self, spec: ModelSpec) -> None:
        if self._stopping:
            return
        process = self._context.Process(
            target=run_worker,
            args=(f"{self._source}:{spec.name}", spec.version, self._options),
            name=f"ketch-worker-{spec.label()}",
            daemon=True,
        )
        process.start()
        self._processes[process.pid] = (spec, process, time.monotonic())
        asyncio.get_running_loop().add_reader(process.sentinel, self._on_exit, process.pid)
        self._events.started(spec, process.pid)

    def _on_exit(self, pid: int) -> None:
        spec, process, started = self._processes.pop(pid)
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.sentinel)
        process.join()
        how = _describe_exit(pid, process.exitcode)
        self._events.exited(spec, pid, how)
        if self._stopping:
            if not self._processes and self._all_exited is not None:
                self._all_exited.set()
            return
        low, high = RESTART_BACKOFF_S
        if time.monotonic() - started > STABLE_RUN_S:
            delay = low
        else:
            delay = min(self._backoff.get(spec.key, low / 2) * 2, high)
        self._backoff[spec.key] = delay
        log.warning("%s; restarting it in %.1f s", how, delay)
        token = next(self._restart_tokens)
        self._restarts[token] = loop.call_later(delay, self._restart, spec, token)

    def _restart(self, spec: ModelSpec, token: int) -> None:
        del self._restarts[token]
        self._spawn(spec)

    def hold_restarts(self) -> None:
        """From now on, a worker that exits stays down (the server is shutting down)."""
        self._stopping = True
        for handle in self._restarts.values():
            handle.cancel()
        self._restarts.clear()

    async def stop(self, grace_s: float = 1.0, timeout_s: float = 5.0) -> None:
        """Stop every worker. The broker has told them DISCONNECT, so most exit on their own
        within ``grace_s``; laggards are terminated, then killed, each within ``timeout_s``."""
        self.hold_restarts()
        self._all_exited = asyncio.Event()
        for wait_s, escalate in ((grace_s, "terminate"), (timeout_s, "kill"), (timeout_s, None)):
            if not self._processes:
                return
            try:
                await asyncio.wait_for(self._all_exited.wait(), wait_s)
                return
            except TimeoutError:
                pass
            if escalate is None:
                raise RuntimeError(f"worker processes {sorted(self._processes)} did not exit")
            for _, process, _ in list(self._processes.values()):
                getattr(process, escalate)()


def _describe_exit(pid: int, exitcode: int | None) -> str:
    if exitcode is None:
        return f"worker pid {pid} exited"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"worker pid {pid} was killed by {name}"
    return f"worker pid {pid} exited with code {exitcode}"
