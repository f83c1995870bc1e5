"""Workers placed by Ray (``ketch serve --placement ray --ray-address ADDRESS``).

Each worker starts as a :class:`~ketch.pools.ray_launcher.WorkerLauncher` actor that asks Ray
for the model's resources (CPUs, GPUs, memory, the custom resources of its ``placement=``), so
Ray picks the node; the launcher starts the worker there, and the worker dials the gateway's
broker over TCP with its CURVE keys. The gateway watches it through :class:`RayWorker`, a
:class:`~ketch.pools.processes.WorkerProcess` like a local one: its sentinel becomes
readable when the worker has ended, however it ended (its exit, or its node's loss).

The served file's folder travels to the nodes through Ray: it is the job's ``working_dir``
(Ray's runtime environment), uploaded once when the gateway connects and unpacked on each node
that runs a worker, which starts there and imports the file from it. Ray's rules for what goes
(at most its size limit; ``.gitignore`` and ``.rayignore`` leave files out) are the user's;
ketch leaves out what is never the model's code (:data:`NEVER_SHIPPED`) and the gateway's own
store and state folders when they are inside it.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from ketch.pools.endpoints import dialable
from ketch.pools.envs import EnvRequest
from ketch.pools.processes import LaunchError
from ketch.specs.models import ModelSpec
from ketch.worker.plan import WorkerPlan

log = logging.getLogger("ketch.workers")

#: Ray's namespace for ketch's actors, so that other jobs of the cluster are told apart.
RAY_NAMESPACE = "ketch"
#: What is left out of the shipped folder (gitignore patterns): version control, caches, and
#: virtual environments, which are built for one machine (a model's env= is built on the node).
NEVER_SHIPPED = (".git/", "__pycache__/", ".venv/", "venv/", ".tox/", ".mypy_cache/")
#: Ray's scheduling strategy for each of :class:`~ketch.specs.models.Placement`'s.
_RAY_STRATEGY = {"spread": "SPREAD", "pack": "DEFAULT"}


class RayPlacement:
    """Where the pools' workers go when Ray places them: connected to the cluster once."""

    def __init__(
        self, address: str, broker: str, source: str | None, own_folders: tuple[Path, ...] = ()
    ) -> None:
        """:param broker: the broker endpoint the workers dial (TCP, reachable from the
        cluster's nodes).
        :param source: the served file (its folder is shipped to the nodes) or module (which
            the nodes must have installed).
        :param own_folders: the gateway's store and state folders, never shipped."""
        if not broker.startswith("tcp://"):
            raise LaunchError(f"--placement ray needs a TCP broker the nodes reach, not {broker}")
        ray = _ray()
        folder, self.source = shipped(source)
        # Ray's init makes SIGTERM exit the process at once: the gateway's own handler (a
        # graceful stop) is put back after it.
        on_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(
                address=address,
                namespace=RAY_NAMESPACE,
                log_to_driver=False,
                configure_logging=False,
                runtime_env=(
                    {"working_dir": str(folder), "excludes": left_out(folder, own_folders)}
                    if folder is not None
                    else None
                ),
            )
        except ValueError as exc:  # Ray's refusal of the folder (too large, unreadable)
            raise LaunchError(
                f"--placement ray ships {folder} to the nodes, and Ray refused it: {exc} "
                "(a .rayignore there leaves files out)"
            ) from None
        finally:
            signal.signal(signal.SIGTERM, on_sigterm)
        # A wildcard host becomes this machine's address in the cluster.
        self.broker = dialable(broker, ray.util.get_node_ip_address)
        from ketch.pools.ray_launcher import WorkerLauncher

        # Threaded, so that wait() blocks one thread while signal() is still answered.
        self._launcher = ray.remote(max_concurrency=4, max_restarts=0)(WorkerLauncher)
        log.info("ray: connected to %s", address)

    def launch(self, spec: ModelSpec, plan: WorkerPlan, output_fd: int) -> RayWorker:
        """Ask Ray for a node with ``spec``'s resources and start a worker there. Returns at
        once; the worker's pid and host are known once it runs."""
        actor = self._launcher.options(
            name=None,
            num_cpus=ray_cpus(spec),
            num_gpus=len(spec.resources.gpus or ()),
            memory=(spec.resources.memory_mb or 0) * 1024 * 1024 or None,
            resources=dict(spec.start.placement.resources) or None,
            scheduling_strategy=_RAY_STRATEGY[spec.start.placement.strategy],
        ).remote()
        return RayWorker(actor, plan, spec, output_fd)

    def shutdown(self) -> None:
        _ray().shutdown()


def shipped(source: str | None) -> tuple[Path | None, str]:
    """The folder to ship for ``source`` (a file's: None for a module name), and ``source`` as
    a worker started in that folder on a node imports it."""
    if source is None:
        return None, ""
    path = Path(source)
    if path.suffix != ".py" and not path.is_file():
        return None, source  # a module, installed on the nodes
    return path.resolve().parent, path.name


def left_out(folder: Path, own_folders: tuple[Path, ...]) -> list[str]:
    """The gitignore patterns left out of ``folder`` as shipped: :data:`NEVER_SHIPPED`, and
    those of ``own_folders`` that are inside it."""
    patterns = list(NEVER_SHIPPED)
    for own in own_folders:
        resolved = own.resolve()
        if resolved.is_relative_to(folder) and resolved != folder:
            patterns.append(f"/{resolved.relative_to(folder).as_posix()}/")
    return patterns


def ray_cpus(spec: ModelSpec) -> float:
    """The CPUs Ray reserves for one worker: as many as its ``cpus=`` names, else one."""
    return float(len(spec.resources.cpus)) if spec.resources.cpus else 1.0


class RayWorker:
    """A worker Ray placed, as the supervisor watches it (see :class:`WorkerProcess`)."""

    def __init__(self, actor: Any, plan: WorkerPlan, spec: ModelSpec, output_fd: int) -> None:
        self._actor = actor
        self._lock = threading.Lock()
        self.pid = 0
        self.host = ""
        self.node: str | None = None
        self.lost_because: str | None = None
        self.recycled_because: str | None = None
        self._exitcode: int | None = None
        # The worker's last lines, written to the supervisor's output pipe when it ends.
        self._output_fd = os.dup(output_fd)
        self._sentinel_r, self._sentinel_w = os.pipe()
        self.sentinel = self._sentinel_r
        # cpus and gpus are indices on the gateway's machine: on the node Ray assigns them.
        resources = {k: v for k, v in (plan.resources or {}).items() if k not in ("cpus", "gpus")}
        placed = WorkerPlan(**{**plan.to_dict(), "resources": resources})
        env = env_request(spec)
        started = actor.start.remote(
            placed.to_json(),
            None if env is not None else spec.start.python,
            spec.resources.memory_mb,
            env,
        )
        started.future().add_done_callback(self._started)
        self._ended = actor.wait.remote()
        self._ended.future().add_done_callback(self._finished)

    # Both callbacks run on Ray's threads: they only set fields and write to pipes.

    def _started(self, future: Any) -> None:
        try:
            where = future.result()
        except Exception:
            return
        with self._lock:
            self.pid, self.host, self.node = where["pid"], where["host"], where["node"]

    def _finished(self, future: Any) -> None:
        try:
            ended = future.result()
        except Exception as exc:
            self.lost_because = (
                f"worker on Ray node {self.node or '(not yet placed)'} was lost: {_brief(exc)}"
            )
        else:
            self._exitcode = ended["exitcode"]
            self.recycled_because = ended["killed_because"]
            self.lost_because = ended["start_error"]
            if ended["output"]:
                os.write(self._output_fd, ("\n".join(ended["output"]) + "\n").encode())
        os.close(self._output_fd)
        os.write(self._sentinel_w, b"x")

    def exitcode(self) -> int | None:
        return self._exitcode

    def kill(self) -> None:
        self._actor.signal.remote(signal.SIGKILL)

    def terminate(self) -> None:
        self._actor.signal.remote(signal.SIGTERM)

    def close(self) -> None:
        """The worker has ended: let its actor go, which gives its resources back to Ray."""
        os.close(self._sentinel_r)
        os.close(self._sentinel_w)
        _ray().kill(self._actor, no_restart=True)


def env_request(spec: ModelSpec) -> dict[str, Any] | None:
    """What the node builds for the model's ``env=`` (read here, where its file is), as plain
    data for Ray to carry; None without one."""
    if spec.start.env is None:
        return None
    request = EnvRequest.declared(spec.start.env)
    return {
        "requirements": list(request.requirements),
        "lock": request.lock,
        "project": request.project,
    }


def _ray() -> Any:
    """Ray, an extra: imported only with ``--placement ray`` (typed loosely, since the
    type check runs without it)."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise LaunchError("--placement ray needs Ray: pip install 'ketch[ray]'") from None


def _brief(exc: BaseException) -> str:
    """The last line of one of Ray's errors (they run to many lines; the cause is last)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
