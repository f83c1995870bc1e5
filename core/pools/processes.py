"""Starting worker and template processes, and the one handle the supervisor watches.

A process starts one of three ways:

- forked from the shared forkserver, whose server has ketch, numpy and pyzmq imported once
  (``multiprocess``'s forkserver): the default, a cold start of about 15 ms, and no copy of
  the gateway's event loop, threads or sockets (which a plain fork would inherit);
- forked from the model's own template (:mod:`ketch.worker.template`, ``preload=True``);
- as a fresh interpreter (``python=``), running :mod:`ketch.worker.main`.

Each gives a :class:`WorkerProcess`: a pid, a sentinel file descriptor that becomes readable
when the process has exited, and then its exit code.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import multiprocess
from multiprocess.connection import Connection

from ketch.errors import KetchError
from ketch.plugins import BUILTIN_PLUGINS
from ketch.runtimes import BUILTIN_RUNTIMES
from ketch.worker.main import forked_main
from ketch.worker.plan import WorkerPlan

Kind = Literal["worker", "template"]


class LaunchError(KetchError):
    """A process could not be started at all (no such interpreter, fork failed, Ray not
    installed for ``--placement ray``)."""


class WorkerProcess(Protocol):
    @property
    def pid(self) -> int: ...

    @property
    def host(self) -> str:
        """The machine it runs on (its hostname, as its READY says)."""

    @property
    def lost_because(self) -> str | None:
        """Why it ended where no exit code says (its machine went away), once it has."""

    @property
    def recycled_because(self) -> str | None:
        """Why it was killed for cause where it runs (over its memory cap, watched on the
        node Ray placed it on), once it has; its batches must fail, not go to another."""

    @property
    def sentinel(self) -> int: ...

    def exitcode(self) -> int | None:
        """Exit code (negative: killed by that signal) once the sentinel is readable."""

    def kill(self) -> None: ...

    def terminate(self) -> None: ...

    def close(self) -> None:
        """Release the handle's file descriptors (after the exit was read)."""


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


def forkserver_context() -> Any:
    context = multiprocess.get_context("forkserver")
    # Each worker builds its plugin manager at start: with the built-in plugins imported
    # here once, that costs it the entry points' lookup, not their imports.
    context.set_forkserver_preload(["ketch.worker.main", *BUILTIN_PLUGINS, *BUILTIN_RUNTIMES])
    return context


def start_process(context: Any, target: Any, args: tuple[Any, ...], name: str) -> Any:
    """A started ``multiprocess`` process running ``target(*args)`` in the forkserver."""
    process = context.Process(target=target, args=args, name=name, daemon=True)
    with _main_module_hidden():
        process.start()
    return process


#: This machine, where the processes started here run.
HOSTNAME = socket.gethostname()


class _ForkserverChild:
    host = HOSTNAME
    lost_because = None
    recycled_because = None

    def __init__(self, process: Any) -> None:
        self._process = process
        self.pid: int = process.pid
        self.sentinel: int = process.sentinel

    def exitcode(self) -> int | None:
        self._process.join()
        code: int | None = self._process.exitcode
        return code

    def kill(self) -> None:
        self._process.kill()

    def terminate(self) -> None:
        self._process.terminate()

    def close(self) -> None:
        self._process.close()


class _InterpreterChild:
    host = HOSTNAME
    lost_because = None
    recycled_because = None

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.sentinel = os.pidfd_open(popen.pid)

    def exitcode(self) -> int | None:
        return self._popen.wait()

    def kill(self) -> None:
        self._popen.kill()

    def terminate(self) -> None:
        self._popen.terminate()

    def close(self) -> None:
        os.close(self.sentinel)


def launch(
    kind: Kind,
    plan: WorkerPlan,
    output_fd: int,
    python: str | None,
    context: Any,
    name: str,
    control: socket.socket | None = None,
) -> WorkerProcess:
    """Start a worker or a template for ``plan`` in a fresh process (not from a template).

    :param output_fd: write end of the pipe its stdout and stderr go to (the caller closes
        its own copy afterwards).
    :param python: another interpreter to run it under; None forks from the forkserver.
    :param control: a template's end of its control socket.
    """
    if python is None:
        output = Connection(os.dup(output_fd), readable=False)
        try:
            process = start_process(context, forked_main, (kind, plan, output, control), name)
        finally:
            output.close()
        return _ForkserverChild(process)
    executable = resolve_python(python)
    argv = [executable, "-m", "ketch.worker.main", kind]
    pass_fds: tuple[int, ...] = ()
    if control is not None:
        argv.append(str(control.fileno()))
        pass_fds = (control.fileno(),)
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=output_fd,
            stderr=output_fd,
            pass_fds=pass_fds,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    except OSError as exc:
        raise LaunchError(f"cannot start {executable}: {exc}") from None
    _hand_plan(popen, plan)
    return _InterpreterChild(popen)


def _hand_plan(popen: subprocess.Popen[bytes], plan: WorkerPlan) -> None:
    """Write the plan to the child's stdin and close it: a few kilobytes, well under a pipe's
    buffer, so this does not wait for the child to read."""
    assert popen.stdin is not None
    try:
        popen.stdin.write(plan.to_json().encode())
        popen.stdin.close()
    except BrokenPipeError:
        pass  # it died at once; its exit is reported like any other


def resolve_python(python: str) -> str:
    """The interpreter ``python`` names: a path (``~`` expanded) or a name on ``PATH``."""
    if os.sep in python:
        path = Path(python).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise LaunchError(f"python={python!r}: no executable interpreter at {path}")
        return str(path)
    found = shutil.which(python)
    if found is None:
        raise LaunchError(f"python={python!r}: no such interpreter on PATH")
    return found


def describe_exit(kind: Kind, pid: int, exitcode: int | None) -> str:
    """``worker pid 42 was killed by SIGKILL`` and the like, for people."""
    if exitcode is None:
        return f"{kind} pid {pid} exited"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"{kind} pid {pid} was killed by {name}"
    return f"{kind} pid {pid} exited with code {exitcode}"
