"""Local worker processes: discovering the served file's models and running their workers.

Processes come from ``multiprocess``'s forkserver, whose server has ketch, numpy and pyzmq
imported once: each worker is a fork of it, so it skips those imports and never inherits the
gateway's event loop, threads or sockets (which a plain fork would copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import multiprocess
import psutil

from ketch.errors import TargetLoadError
from ketch.loader import Target, find_model, load_models
from ketch.models import ModelSpec
from ketch.resources import Resources, over_memory_cap
from ketch.resources import apply as apply_resources
from ketch.restarts import CrashHistory, RestartPolicy
from ketch.runtimes.python import make_predict
from ketch.zmq_transport import worker
from ketch.zmq_transport.liveness import Heartbeat

log = logging.getLogger("ketch.workers")


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start processes without re-importing the parent's ``__main__`` in them.

    multiprocessing's spawn and forkserver children re-run the parent's main module; for
    ``ketch serve`` that is the CLI, which would import the whole gateway (Starlette,
    Hypercorn) into every worker and slow every cold start. Workers need none of it.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _context() -> Any:
    context = multiprocess.get_context("forkserver")
    context.set_forkserver_preload(["ketch.workers"])
    return context


def run_worker(
    target: str,
    version: str | None,
    options: worker.WorkerOptions,
    load_errors: Any = None,
    resources: dict[str, Any] | None = None,
) -> None:
    """Worker process body: load the model named by ``target`` and serve it.

    :param load_errors: a connection that receives the error text when the model cannot be
        loaded, so the gateway can say why the worker died.
    :param resources: the model's limits, when the starter knows them: applied before the
        model's module is imported, so its libraries load with them. The model's own
        declaration is applied again once it is loaded (all a hand-started worker has).
    """
    if not options.rejoin:
        # Started by `ketch serve`: Ctrl-C reaches the whole process group, and the gateway
        # alone decides when its workers stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if resources is not None:
            apply_resources(Resources.from_dict(resources))
        model = find_model(Target.parse(target), version)
        apply_resources(model.spec.resources)
        predict = make_predict(model)
    except BaseException as exc:
        if load_errors is not None:
            load_errors.send(_error_text(exc))
        raise
    finally:
        if load_errors is not None:
            load_errors.close()
    worker.serve(model.spec, predict, options)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, TargetLoadError):
        return str(exc)
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


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
    with _main_module_hidden():
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
    """Where :class:`LocalWorkers` reports process starts and exits (the dispatcher).

    ``exited`` gets the exit described for people (exit code or signal, and the load error if
    the model could not be loaded) and whether it was expected (scaled down, shutting down);
    ``unhealthy`` is called once the model's workers have crashed too often in a row.
    """

    started: Callable[[ModelSpec, int], None]
    exited: Callable[[ModelSpec, int, str, bool], None]
    unhealthy: Callable[[ModelSpec, str], None]


@dataclass(slots=True)
class _Process:
    spec: ModelSpec
    handle: Any
    started: float
    load_errors: Any
    watched: psutil.Process
    #: Why the gateway killed it (over its memory cap), for the exit's description.
    killed_because: str | None = None


class LocalWorkers:
    """Starts and watches the worker processes the pool manager asks for.

    A process that exits unasked is reported at once (so its batches are retried without
    waiting for missed heartbeats); each quick exit in a row makes the next start of that
    model wait longer, and too many mark the model unhealthy (:mod:`ketch.restarts`).

    :param source: the served file or module.
    :param broker: endpoint the workers connect to.
    :param heartbeat: heartbeat settings shared with the broker.
    :param events: receives starts, exits and give-ups.
    """

    def __init__(
        self,
        source: str,
        broker: str,
        heartbeat: Heartbeat,
        events: ProcessEvents,
        restart_policy: RestartPolicy | None = None,
    ) -> None:
        self._source = source
        self._options = worker.WorkerOptions(broker=broker, heartbeat=heartbeat)
        self._events = events
        self._policy = restart_policy or RestartPolicy()
        self._context = _context()
        self._processes: dict[int, _Process] = {}
        self._retired: set[int] = set()
        self._crashes: dict[tuple[str, str], CrashHistory] = {}
        self._not_before: dict[tuple[str, str], float] = {}
        self._stopping = False
        self._all_exited: asyncio.Event | None = None

    def pids(self, spec: ModelSpec) -> set[int]:
        return {pid for pid, entry in self._processes.items() if entry.spec.key == spec.key}

    def spawn(self, spec: ModelSpec) -> bool:
        """Start a worker for ``spec``; False while its restart backoff has not elapsed."""
        if self._stopping or time.monotonic() < self._not_before.get(spec.key, 0.0):
            return False
        load_errors, child_end = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=run_worker,
            args=(
                f"{self._source}:{spec.name}",
                spec.version,
                self._options,
                child_end,
                asdict(spec.resources),
            ),
            name=f"ketch-worker-{spec.label()}",
            daemon=True,
        )
        with _main_module_hidden():
            process.start()
        child_end.close()
        self._processes[process.pid] = _Process(
            spec, process, time.monotonic(), load_errors, psutil.Process(process.pid)
        )
        asyncio.get_running_loop().add_reader(process.sentinel, self._on_exit, process.pid)
        self._events.started(spec, process.pid)
        return True

    def over_memory(self) -> list[tuple[ModelSpec, int, str]]:
        """Kill every worker over its model's ``memory_mb``; returns (spec, pid, why) of each."""
        killed = []
        for pid, entry in self._processes.items():
            cap = entry.spec.resources.memory_mb
            if cap is None or entry.killed_because is not None:
                continue
            rss_mb = over_memory_cap(entry.watched, cap)
            if rss_mb is None:
                continue
            entry.killed_because = (
                f"worker pid {pid} was recycled: it used {rss_mb} MB of resident memory, "
                f"over its memory_mb cap of {cap} MB"
            )
            entry.handle.kill()
            killed.append((entry.spec, pid, entry.killed_because))
        return killed

    def retire(self, pid: int) -> None:
        """``pid`` is about to be told DISCONNECT: its exit is expected, not a crash."""
        self._retired.add(pid)

    def _on_exit(self, pid: int) -> None:
        entry = self._processes.pop(pid)
        spec, process = entry.spec, entry.handle
        asyncio.get_running_loop().remove_reader(process.sentinel)
        process.join()
        how = entry.killed_because or _describe_exit(pid, process.exitcode)
        try:
            if entry.load_errors.poll(0):
                how = f"{how}: cannot load the model: {entry.load_errors.recv()}"
        except (EOFError, OSError):
            pass
        finally:
            entry.load_errors.close()
        expected = self._stopping or pid in self._retired
        self._retired.discard(pid)
        self._events.exited(spec, pid, how, expected)
        if self._stopping:
            if not self._processes and self._all_exited is not None:
                self._all_exited.set()
            return
        if expected:
            return
        history = self._crashes.setdefault(spec.key, CrashHistory(self._policy))
        delay = history.restart_delay(time.monotonic() - entry.started)
        if delay is None:
            log.error("%s; giving up after %d quick exits in a row", how, history.quick_exits)
            self._events.unhealthy(
                spec, f"{history.quick_exits} workers in a row exited early; the last: {how}"
            )
            return
        log.warning("%s; its replacement may start in %.1f s", how, delay)
        self._not_before[spec.key] = time.monotonic() + delay

    def hold_restarts(self) -> None:
        """From now on no worker starts (the server is shutting down)."""
        self._stopping = True

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
            for entry in list(self._processes.values()):
                getattr(entry.handle, escalate)()


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
