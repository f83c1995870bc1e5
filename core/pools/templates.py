"""The gateway's side of per-model template processes (``preload=True``).

A template (:mod:`ketch.worker.template`, where the control socket's messages are described)
loads its model once and forks a worker per request. Here: the control socket's creation,
asking a template for a worker (:func:`fork_worker`), reading its READY, and
:class:`TemplateChild`, a forked worker as the supervisor watches it.
"""

from __future__ import annotations

import json
import os
import signal
import socket

from ketch.worker.plan import WorkerPlan
from ketch.worker.template import EXIT_STATUS, send_message

#: Longest wait for a template to fork a child and answer with its pid.
FORK_TIMEOUT_S = 10.0


def control_pair() -> tuple[socket.socket, socket.socket]:
    """(gateway end, template end) of a new control socket."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class TemplateChild:
    """A worker forked by a template, as the gateway sees it (see :class:`WorkerProcess`)."""

    host = socket.gethostname()
    lost_because = None
    recycled_because = None

    def __init__(self, pid: int, status_fd: int) -> None:
        self.pid = pid
        self.sentinel = status_fd
        self._exitcode: int | None = None
        self._exited = False

    def exitcode(self) -> int | None:
        """The exit code once the sentinel is readable; None when the template died first."""
        if not self._exited:
            data = os.read(self.sentinel, EXIT_STATUS.size)
            self._exited = True
            if len(data) == EXIT_STATUS.size:
                (self._exitcode,) = EXIT_STATUS.unpack(data)
            else:
                # The template died and took the exit code with it: make sure the child
                # is gone too, so the gateway's picture is true.
                self.kill()
        return self._exitcode

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        if self._exited and self._exitcode is not None:
            return  # reaped: the pid may belong to someone else now
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        os.close(self.sentinel)


def fork_worker(control: socket.socket, plan: WorkerPlan, output_fd: int) -> TemplateChild:
    """Ask the template behind ``control`` for a worker running ``plan``; its output goes to
    ``output_fd`` (the caller keeps and closes its own copy)."""
    status_r, status_w = os.pipe()
    try:
        send_message(control, {"plan": plan.to_dict()}, [output_fd, status_w])
    finally:
        os.close(status_w)
    control.settimeout(FORK_TIMEOUT_S)
    try:
        reply = json.loads(control.recv(1 << 16) or b"{}")
    except (TimeoutError, OSError, ValueError) as exc:
        os.close(status_r)
        raise OSError(f"the template did not answer a fork request: {exc!r}") from None
    if "pid" not in reply:
        os.close(status_r)
        raise OSError(reply.get("error", "the template closed its control socket"))
    return TemplateChild(reply["pid"], status_r)


def read_ready(control: socket.socket) -> int | None:
    """The template's pid from its READY message (call once the socket is readable); None
    when the socket has closed instead (the template could not load the model: its output
    says why)."""
    data = control.recv(1 << 16)
    if not data:
        return None
    pid: int = json.loads(data)["pid"]
    return pid
