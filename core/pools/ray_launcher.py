"""The node side of Ray placement: a small actor that starts one worker process where Ray put
it, watches it, and tells the gateway how it ended.

Ray reserves the model's resources for the actor; the worker is the actor's child (a fresh
interpreter running :mod:`ketch.worker.main`, its plan on stdin), so everything a local worker
does holds: its memory cap, its heartbeats, its exit code. The child dies with the actor
(``PR_SET_PDEATHSIG``): a node that goes away takes its workers with it, never leaving one
serving without a pool that counts it.
"""

from __future__ import annotations

import collections
import ctypes
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil

#: Lines of a worker's output kept for the description of its exit.
_TAIL_LINES = 20
#: How often the worker's resident memory is compared with its cap.
_MEMORY_CHECK_S = 0.1
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: the kernel kills it when the launcher goes."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class WorkerLauncher:
    """One worker process on this node. Ray calls its methods from several threads (the
    actor is threaded): :meth:`wait` blocks until the worker ends while :meth:`signal` and
    :meth:`where` still answer."""

    def __init__(self) -> None:
        self._child: subprocess.Popen[bytes] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._killed_because: str | None = None
        self._ended = threading.Event()
        #: Set once start() has started the worker or failed to (then ``_start_error``).
        self._started = threading.Event()
        self._start_error: str | None = None

    def start(
        self,
        plan_json: str,
        python: str | None,
        memory_mb: int | None,
        env: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Start the worker; answers where it runs (host, pid, Ray's node id).

        :param env: the model's ``env=`` (what :func:`env_request` gives), built on this node
            with uv, once per content, in the node's own store; its interpreter runs the
            worker (``python`` is then not used: it names a path on the gateway's machine).
        """
        try:
            if env is not None:
                python = self._build_env(env)
            return self._start(plan_json, python, memory_mb)
        except Exception as exc:
            self._start_error = f"could not start the worker on its node: {exc}"
            raise
        finally:
            self._started.set()

    def _build_env(self, env: dict[str, Any]) -> str:
        """The interpreter of the model's environment on this node, built here if it is not
        yet (concurrent launchers on one node build it once: the build takes a file lock)."""
        import asyncio

        from ketch.applications.state import default_state_dir
        from ketch.pools.envs import Environments, EnvRequest

        store = os.environ.get("KETCH_STORE") or str(default_state_dir() / "store")
        request = EnvRequest(
            requirements=tuple(env["requirements"]), lock=env["lock"], project=env["project"]
        )
        envs = Environments(Path(store) / "envs")
        built = envs.find(request.key()) or asyncio.run(envs.ensure(request, self._tail.append))
        return built.python

    def _start(self, plan_json: str, python: str | None, memory_mb: int | None) -> dict[str, Any]:
        ray: Any = importlib.import_module("ray")  # on the node, where the actor runs
        node = ray.get_runtime_context().get_node_id()
        plan_json = json.dumps({**json.loads(plan_json), "node": node})
        argv = [python or sys.executable, "-m", "ketch.worker.main", "worker"]
        self._child = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=_die_with_parent,
        )
        assert self._child.stdin is not None
        try:
            self._child.stdin.write(plan_json.encode())
            self._child.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; wait() says how
        threading.Thread(target=self._read_output, daemon=True).start()
        if memory_mb is not None:
            threading.Thread(target=self._watch_memory, args=(memory_mb,), daemon=True).start()
        return {
            "pid": self._child.pid,
            "host": socket.gethostname(),
            "node": node,
        }

    def wait(self) -> dict[str, Any]:
        """Block until the worker has ended: its exit code, why it was killed, its last lines.
        (Ray may run it before :meth:`start`: it waits for the start first.)"""
        self._started.wait()
        if self._child is None:
            return {
                "exitcode": None,
                "killed_because": None,
                "start_error": self._start_error,
                "output": [],
            }
        exitcode = self._child.wait()
        self._ended.set()
        return {
            "exitcode": exitcode,
            "killed_because": self._killed_because,
            "start_error": None,
            "output": list(self._tail),
        }

    def signal(self, signum: int) -> None:
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signum)

    def _read_output(self) -> None:
        assert self._child is not None and self._child.stdout is not None
        for line in self._child.stdout:
            self._tail.append(line.decode(errors="replace").rstrip("\n"))

    def _watch_memory(self, cap_mb: int) -> None:
        """Kill the worker once its resident memory passes its model's ``memory_mb``, as the
        gateway does for its own workers (a sampling period, not a wait for a peer)."""
        assert self._child is not None
        try:
            process = psutil.Process(self._child.pid)
            while not self._ended.wait(_MEMORY_CHECK_S):
                rss_mb = process.memory_info().rss // (1024 * 1024)
                if rss_mb > cap_mb:
                    self._killed_because = (
                        f"worker pid {self._child.pid} was recycled: it used {rss_mb} MB of "
                        f"resident memory, over its memory_mb cap of {cap_mb} MB"
                    )
                    self._child.kill()
                    return
        except psutil.Error:
            return  # it is gone; wait() says how
