"""Local worker processes: starting and supervising workers and templates.

How a process starts (shared forkserver, the model's template, another interpreter) is
:mod:`ketch.pools.processes`; this module decides when, watches each process's exit and output,
and reports them to the dispatcher.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import psutil

from ketch import __version__
from ketch.plugin_manager import Plugins
from ketch.pools.cgroups import MemoryCgroups
from ketch.pools.processes import (
    HOSTNAME,
    Kind,
    LaunchError,
    WorkerProcess,
    describe_exit,
    forkserver_context,
    launch,
    resolve_python,
)
from ketch.pools.ray_placement import RayPlacement
from ketch.pools.restarts import KILLED_FROM_OUTSIDE, CrashHistory, RestartPolicy
from ketch.pools.templates import control_pair, fork_worker, read_ready
from ketch.pools.worker_output import OutputTail
from ketch.serving.sink import ProcessKey
from ketch.specs.models import ModelSpec
from ketch.specs.resources import over_memory_cap
from ketch.worker.plan import WorkerPlan
from ketch.zmq_transport.liveness import Heartbeat
from ketch.zmq_transport.security import WorkerKeys

log = logging.getLogger("ketch.workers")


@dataclass(frozen=True, slots=True)
class ProcessEvents:
    """Where :class:`WorkerProcesses` reports what happens to its processes (the dispatcher).

    ``recycled`` is called when a worker placed elsewhere was killed for cause where it ran
    (its memory cap), before its exit: its batches fail with the cause rather than go to
    another worker, as for one recycled here. ``exited`` gets the exit described for people
    (exit code or signal, and the last lines the worker printed) and whether it was expected
    (scaled down, shutting down); ``unhealthy`` is
    called when the model cannot start at all (no such interpreter); ``crash_looping`` after
    each of its quick exits in a row once there are enough of them
    (:attr:`RestartPolicy.crash_loop_after`), with the cause, the count and the seconds until
    the next attempt; ``template`` gets a ``preload=True`` model's template as it changes
    (None: it is gone).
    """

    started: Callable[[ModelSpec, ProcessKey], None]
    exited: Callable[[ModelSpec, ProcessKey, str, bool], None]
    unhealthy: Callable[[ModelSpec, str], None]
    crash_looping: Callable[[ModelSpec, str, int, float], None]
    template: Callable[[ModelSpec, dict[str, Any] | None], None]
    recycled: Callable[[ModelSpec, ProcessKey, str], None]


@dataclass(slots=True)
class _Process:
    spec: ModelSpec
    kind: Kind
    handle: WorkerProcess
    output: OutputTail
    started: float
    #: Its memory, read here; None where it runs on another machine.
    watched: psutil.Process | None
    #: Why the gateway killed it (over its memory cap), for the exit's description.
    killed_because: str | None = None
    #: It said READY: killed from outside afterwards, it did not crash.
    joined: bool = False
    #: Its cgroup with the model's ``memory.max``, where ketch could make one.
    cgroup: Path | None = None


@dataclass(slots=True)
class _Template:
    pid: int
    #: The id it was launched with, its key among the processes.
    launch: ProcessKey
    control: socket.socket
    ready: bool = False


class WorkerProcesses:
    """Starts and watches the worker processes the pool manager asks for.

    A process that exits unasked is reported at once (so its batches are retried without
    waiting for missed heartbeats); each quick exit in a row makes the next start of that
    model wait longer, up to a cap, and enough of them make it crash-looping
    (:mod:`ketch.pools.restarts`). A
    ``preload=True`` model gets a template process as soon as it is managed, kept while the
    server runs, and its workers fork from it.

    :param source: the served file or module.
    :param broker: endpoint the workers connect to.
    :param heartbeat: heartbeat settings shared with the broker.
    :param events: receives starts, exits and give-ups.
    :param plugins: the gateway's plugins, which each worker loads too (from its plan).
    :param broker_keys: the CURVE keys the workers join with; None for an insecure broker.
    :param memory_cgroups: where workers with a ``memory_mb`` get a cgroup ``memory.max``;
        None where the machine does not let ketch make one.
    :param placement: Ray, which places every worker on a node of its cluster; None starts
        them here. Placed workers start as fresh interpreters (no template: a template
        lives on one machine).
    """

    def __init__(
        self,
        source: str,
        broker: str,
        heartbeat: Heartbeat,
        events: ProcessEvents,
        plugins: Plugins,
        restart_policy: RestartPolicy | None = None,
        broker_keys: WorkerKeys | None = None,
        memory_cgroups: MemoryCgroups | None = None,
        placement: RayPlacement | None = None,
    ) -> None:
        self._cgroups = memory_cgroups
        self._placement = placement
        self._source = source
        self._broker_keys = broker_keys.to_dict() if broker_keys is not None else None
        self._plugins = plugins
        self._broker = broker
        self._heartbeat = heartbeat
        self._events = events
        self._policy = restart_policy or RestartPolicy()
        self._context = forkserver_context()
        self._processes: dict[ProcessKey, _Process] = {}
        self._launch_prefix = secrets.token_hex(4)
        self._launches = itertools.count(1)
        self._templates: dict[tuple[str, str], _Template] = {}
        self._retired: set[ProcessKey] = set()
        self._crashes: dict[tuple[str, str, Kind], CrashHistory] = {}
        self._not_before: dict[tuple[str, str], float] = {}
        #: Models no longer served: a template restart that was pending is skipped.
        self._released: set[tuple[str, str]] = set()
        self._stopping = False
        self._all_exited: asyncio.Event | None = None

    def started(self, spec: ModelSpec) -> set[ProcessKey]:
        """The worker processes started for ``spec`` (not its template)."""
        return {
            process
            for process, entry in self._processes.items()
            if entry.spec.key == spec.key and entry.kind == "worker"
        }

    def prepare(self, spec: ModelSpec) -> None:
        """Get ``spec`` ready for its first worker: check its interpreter, start its template
        if it has one. A model that cannot start is reported unhealthy now, not at its first
        request."""
        if self._placement is not None:
            self._released.discard(spec.key)
            return  # its interpreter is looked for on the node Ray picks
        if spec.start.python is not None:
            try:
                resolve_python(spec.start.python)
            except LaunchError as exc:
                self._cannot_start(spec, "worker", exc)
                return
        self._released.discard(spec.key)
        if spec.start.preload and spec.key not in self._templates:
            self._start_template(spec)

    def joined(self, process: ProcessKey) -> None:
        """Worker ``process`` said READY."""
        entry = self._processes.get(process)
        if entry is not None:
            entry.joined = True

    def retry_at(self, spec: ModelSpec) -> float | None:
        """When a worker of ``spec`` may start again (``time.monotonic()``) while it is backing
        off after a crash; None when it may start now."""
        at = self._not_before.get(spec.key)
        return at if at is not None and at > time.monotonic() else None

    def spawn(self, spec: ModelSpec) -> bool:
        """Start a worker for ``spec``; False while it cannot start yet (restart backoff, its
        template still loading) or at all (then the model has been reported unhealthy)."""
        if self._stopping or time.monotonic() < self._not_before.get(spec.key, 0.0):
            return False
        preload = spec.start.preload and self._placement is None
        template = self._templates.get(spec.key) if preload else None
        if preload and (template is None or not template.ready):
            self.prepare(spec)
            return False
        launch_id = self._launch_id()
        output_r, output_w = os.pipe()
        try:
            if self._placement is not None:
                plan = self._plan(spec, launch_id, broker=self._placement.broker)
                handle: WorkerProcess = self._placement.launch(spec, plan, output_w)
            elif template is not None:
                plan = self._plan(spec, launch_id)
                handle = fork_worker(template.control, plan, output_w)
            else:
                handle = launch(
                    "worker",
                    self._plan(spec, launch_id),
                    output_w,
                    spec.start.python,
                    self._context,
                    f"ketch-worker-{spec.label()}",
                )
        except (LaunchError, OSError) as exc:
            os.close(output_r)
            self._cannot_start(spec, "worker", exc)
            return False
        finally:
            os.close(output_w)
        self._watch(spec, "worker", handle, output_r, launch_id)
        self._events.started(spec, launch_id)
        return True

    def _launch_id(self) -> ProcessKey:
        """A new process's id: this supervisor's prefix (random, so that the ids of several
        gateways never meet) and a count."""
        return f"{self._launch_prefix}-{next(self._launches)}"

    def _plan(
        self, spec: ModelSpec, launch_id: ProcessKey, broker: str | None = None
    ) -> WorkerPlan:
        return WorkerPlan(
            target=f"{self._source}:{spec.name}",
            version=spec.version,
            broker=broker or self._broker,
            heartbeat_interval_s=self._heartbeat.interval_s,
            heartbeat_liveness=self._heartbeat.liveness,
            resources=msgspec.to_builtins(spec.resources),
            deployment=spec.to_dict() if spec.deployed else None,
            plugins=self._plugins.references,
            autoload=self._plugins.autoload,
            broker_keys=self._broker_keys,
            launch=launch_id,
        )

    def _start_template(self, spec: ModelSpec) -> None:
        if self._stopping:
            return
        gateway_end, template_end = control_pair()
        launch_id = self._launch_id()
        output_r, output_w = os.pipe()
        try:
            handle = launch(
                "template",
                self._plan(spec, launch_id),
                output_w,
                spec.start.python,
                self._context,
                f"ketch-template-{spec.label()}",
                control=template_end,
            )
        except (LaunchError, OSError) as exc:
            os.close(output_r)
            gateway_end.close()
            self._cannot_start(spec, "template", exc)
            return
        finally:
            os.close(output_w)
            template_end.close()
        self._watch(spec, "template", handle, output_r, launch_id)
        template = _Template(handle.pid, launch_id, gateway_end)
        self._templates[spec.key] = template
        asyncio.get_running_loop().add_reader(
            gateway_end.fileno(), self._on_template_ready, spec, template
        )
        self._events.template(spec, {"pid": handle.pid, "state": "loading"})

    def _on_template_ready(self, spec: ModelSpec, template: _Template) -> None:
        asyncio.get_running_loop().remove_reader(template.control.fileno())
        if read_ready(template.control) is None:
            return  # it could not load the model; its exit reports why
        template.ready = True
        try:
            rss_mb = psutil.Process(template.pid).memory_info().rss // (1024 * 1024)
        except psutil.Error:
            return  # died meanwhile; its exit reports why
        log.info("template of %s ready: pid %d, %d MB", spec.label(), template.pid, rss_mb)
        self._events.template(spec, {"pid": template.pid, "state": "ready", "rss_mb": rss_mb})

    def _cannot_start(self, spec: ModelSpec, kind: Kind, exc: Exception) -> None:
        if isinstance(exc, LaunchError):
            self._events.unhealthy(spec, f"cannot start its {kind}: {exc}")
            return
        # The template failed to fork: replace it, and let the next worker wait a little.
        log.error("cannot start a %s for %s: %s", kind, spec.label(), exc)
        self._not_before[spec.key] = time.monotonic() + self._policy.first_delay_s
        template = self._templates.get(spec.key)
        if template is not None:
            self._processes[template.launch].handle.kill()

    def _watch(
        self,
        spec: ModelSpec,
        kind: Kind,
        handle: WorkerProcess,
        output_r: int,
        process: ProcessKey,
    ) -> None:
        name = f"{spec.label()} {'' if kind == 'worker' else kind + ' '}pid {handle.pid}"
        cap = spec.resources.memory_mb
        cgroup = None
        local = handle.host == HOSTNAME
        if kind == "worker" and cap is not None and self._cgroups is not None and local:
            cgroup = self._cgroups.confine(handle.pid, cap)
        self._processes[process] = _Process(
            spec,
            kind,
            handle,
            OutputTail(output_r, name),
            time.monotonic(),
            psutil.Process(handle.pid) if local else None,
            cgroup=cgroup,
        )
        asyncio.get_running_loop().add_reader(handle.sentinel, self._on_exit, process)

    def over_memory(self) -> list[tuple[ModelSpec, ProcessKey, str]]:
        """Kill every worker of this machine over its model's ``memory_mb``; returns (spec,
        process, why) of each. (A worker placed elsewhere is watched where it runs.)"""
        killed = []
        for process, entry in self._processes.items():
            cap = entry.spec.resources.memory_mb
            if cap is None or entry.kind != "worker" or entry.killed_because is not None:
                continue
            if entry.watched is None:
                continue
            rss_mb = over_memory_cap(entry.watched, cap)
            if rss_mb is None:
                continue
            entry.killed_because = (
                f"worker pid {entry.handle.pid} was recycled: it used {rss_mb} MB of resident "
                f"memory, over its memory_mb cap of {cap} MB"
            )
            entry.handle.kill()
            killed.append((entry.spec, process, entry.killed_because))
        return killed

    def retire(self, process: ProcessKey) -> None:
        """``process`` is about to be told DISCONNECT: its exit is expected, not a crash."""
        self._retired.add(process)

    def kill(self, process: ProcessKey, why: str) -> None:
        """Kill worker ``process`` for cause (it hung); its exit is described with ``why``.
        Nothing for a process it did not start."""
        entry = self._processes.get(process)
        if entry is None or entry.kind != "worker" or entry.killed_because is not None:
            return
        entry.killed_because = f"worker pid {entry.handle.pid} was killed: {why}"
        entry.handle.kill()

    def release(self, spec: ModelSpec, still_starting: set[ProcessKey]) -> None:
        """``spec`` is no longer served: stop its template and its workers still starting
        (``still_starting``), and forget its restart history (the model may be added again,
        afresh). Its ready workers were told DISCONNECT and exit by themselves."""
        self._crashes = {k: v for k, v in self._crashes.items() if k[:2] != spec.key}
        self._not_before.pop(spec.key, None)
        self._released.add(spec.key)
        template = self._templates.pop(spec.key, None)
        if template is not None:
            if not template.ready:
                asyncio.get_running_loop().remove_reader(template.control.fileno())
            template.control.close()
        for process, entry in self._processes.items():
            if entry.spec.key != spec.key:
                continue
            self._retired.add(process)
            if entry.kind == "template" or process in still_starting:
                entry.handle.terminate()

    def _on_exit(self, process: ProcessKey) -> None:
        entry = self._processes.pop(process)
        pid = entry.handle.pid
        asyncio.get_running_loop().remove_reader(entry.handle.sentinel)
        exitcode = entry.handle.exitcode()
        entry.handle.close()
        entry.output.drain()
        if entry.killed_because is None and entry.handle.recycled_because is not None:
            entry.killed_because = entry.handle.recycled_because
            self._events.recycled(entry.spec, process, entry.killed_because)
        if entry.cgroup is not None:
            if entry.killed_because is None and MemoryCgroups.oom_killed(entry.cgroup):
                entry.killed_because = (
                    f"worker pid {pid} was killed by the kernel: it passed its memory_mb cap of "
                    f"{entry.spec.resources.memory_mb} MB (its cgroup's memory.max)"
                )
            MemoryCgroups.remove(entry.cgroup)
        how = (
            entry.killed_because
            or entry.handle.lost_because
            or describe_exit(entry.kind, pid, exitcode)
        )
        if entry.killed_because is None and (tail := entry.output.tail()):
            how = f"{how}; its last output:\n{tail}"
            if entry.spec.start.python is not None and "No module named 'ketch'" in tail:
                how += (
                    f"\n(install ketch=={__version__} for {entry.spec.start.python} "
                    "to run this model's workers there)"
                )
        entry.output.close()
        expected = self._stopping or process in self._retired
        self._retired.discard(process)
        if entry.kind == "template":
            self._template_exited(entry, how, expected)
        else:
            self._worker_exited(entry, process, how, expected, exitcode)
        if self._stopping and not self._processes and self._all_exited is not None:
            self._all_exited.set()

    def _worker_exited(
        self, entry: _Process, process: ProcessKey, how: str, expected: bool, exitcode: int | None
    ) -> None:
        spec = entry.spec
        looping: tuple[str, int, float] | None = None
        if not expected:
            # Decided before the exit is reported: the pool reacts to the report at once, and
            # must find the back-off already in place.
            delay, looping = self._restart_delay(entry, how, exitcode)
            log.warning("%s; its replacement may start in %.1f s", how, delay)
            self._not_before[spec.key] = time.monotonic() + delay
        self._events.exited(spec, process, how, expected)
        if looping is not None:
            # After the exit: the model then has no process starting, which is what makes
            # it unhealthy while it waits.
            self._events.crash_looping(spec, *looping)

    def _template_exited(self, entry: _Process, how: str, expected: bool) -> None:
        spec = entry.spec
        template = self._templates.pop(spec.key, None)
        if template is not None:
            if not template.ready:
                asyncio.get_running_loop().remove_reader(template.control.fileno())
            template.control.close()
        self._events.template(spec, None)
        if expected:
            return
        if template is None or not template.ready:
            how = f"its template could not load the model: {how}"
        delay, looping = self._restart_delay(entry, how, None)
        if looping is not None:
            self._events.crash_looping(spec, *looping)
        log.warning("%s; a new template starts in %.1f s", how, delay)
        # Its workers wait for it: none may start before it is back.
        self._not_before[spec.key] = time.monotonic() + delay
        asyncio.get_running_loop().call_later(delay, self._restart_template, spec)

    def _restart_template(self, spec: ModelSpec) -> None:
        if spec.key in self._released:
            return  # the model was removed while its template backed off
        self.prepare(spec)

    def _restart_delay(
        self, entry: _Process, how: str, exitcode: int | None
    ) -> tuple[float, tuple[str, int, float] | None]:
        """Back-off before replacing ``entry``, and, once it is crash-looping, what to report:
        the cause, the quick exits in a row, the delay."""
        key = (*entry.spec.key, entry.kind)
        history = self._crashes.setdefault(key, CrashHistory(self._policy))
        killed_after_joining = (
            entry.joined and entry.killed_because is None and exitcode in KILLED_FROM_OUTSIDE
        )
        delay = history.restart_delay(
            time.monotonic() - entry.started, killed_after_joining=killed_after_joining
        )
        if not history.crash_looping or killed_after_joining:
            return delay, None
        cause = f"{history.quick_exits} {entry.kind}s in a row exited early; the last: {how}"
        return delay, (cause, history.quick_exits, delay)

    def hold_restarts(self) -> None:
        """From now on no worker starts (the server is shutting down)."""
        self._stopping = True

    async def stop(self, grace_s: float = 1.0, timeout_s: float = 5.0) -> None:
        """Stop every worker and template. The broker has told the workers DISCONNECT, so most
        exit on their own within ``grace_s``, and a template exits once its workers have;
        laggards are terminated, then killed, each within ``timeout_s``."""
        self.hold_restarts()
        self._all_exited = asyncio.Event()
        for template in self._templates.values():
            if not template.ready:
                asyncio.get_running_loop().remove_reader(template.control.fileno())
            template.control.close()
        self._templates.clear()
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
