"""A template process (``preload=True``): the model loaded once, a worker forked per request.

A template is a small fork server. It loads the model once (``import torch`` and all), says
READY on its control socket, and then forks one worker per request from the gateway. Each
child skips every import the template made, so a pool at zero comes back in milliseconds even
for a heavy model; the price is the template's own memory, which ``GET /models`` reports.

The control socket is a ``SOCK_SEQPACKET`` pair: one JSON message per packet
(:func:`send_message`), file descriptors alongside. The gateway sends ``{"plan": ...}`` with
two descriptors (the write end of the child's output pipe and of its status pipe) and reads
back ``{"pid": N}``. When the child exits, the template reaps it and writes its exit code
(:data:`EXIT_STATUS`, negative for a signal) to the status pipe, whose read end is the
gateway's sentinel for the child. When the template itself dies, the status pipes reach end
of file instead. The gateway's side is :mod:`ketch.pools.templates`.
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from ketch.specs.models import ModelSpec
from ketch.specs.resources import Resources
from ketch.specs.resources import apply as apply_resources
from ketch.types import Predict
from ketch.worker.plan import WorkerPlan
from ketch.worker.run import load, redirect_output
from ketch.zmq_transport import worker

#: A child's exit code on its status pipe: a 4-byte signed int, negative for a signal.
EXIT_STATUS = struct.Struct("i")


def send_message(control: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """One JSON message on a control socket, with ``fds`` passed alongside."""
    socket.send_fds(control, [json.dumps(message).encode()], list(fds))


def run_template(plan: WorkerPlan, control_fd: int) -> NoReturn:
    """Template process body: load the model, then fork a worker per request until the
    gateway closes the control socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=control_fd)
    spec, predict = load(plan)
    # Frozen before any fork: the children's collections never walk (nor touch, and so copy)
    # the model the template loaded.
    gc.freeze()
    send_message(control, {"ready": True, "pid": os.getpid()})
    _Zygote(control, spec, predict).serve()


class _Zygote:
    def __init__(self, control: socket.socket, spec: ModelSpec, predict: Predict) -> None:
        self._control = control
        self._spec = spec
        self._predict = predict
        self._status_fds: dict[int, int] = {}
        self._closing = False
        # SIGCHLD wakes the selector through the wakeup fd; the handler itself does nothing.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._control, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)

    def serve(self) -> NoReturn:
        while True:
            for key, _ in self._selector.select():
                if key.fileobj == self._wake_r:
                    while True:
                        try:
                            if not os.read(self._wake_r, 512):
                                break
                        except BlockingIOError:
                            break
                    self._reap()
                else:
                    self._on_request()

    def _on_request(self) -> None:
        message, fds, _, _ = socket.recv_fds(self._control, 1 << 20, 2)
        if not message:
            # The gateway closed the control socket: it is shutting down. Our children are
            # its workers and leave when it tells them to; we stay to report their exits.
            self._selector.unregister(self._control)
            self._closing = True
            self._exit_when_childless()
            return
        output_fd, status_fd = fds
        plan = WorkerPlan.from_dict(json.loads(message)["plan"])
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(output_fd)
            os.close(status_fd)
            send_message(self._control, {"error": f"fork failed: {exc}"})
            return
        if pid == 0:
            self._child(plan, output_fd, status_fd)
        os.close(output_fd)
        self._status_fds[pid] = status_fd
        send_message(self._control, {"pid": pid})

    def _child(self, plan: WorkerPlan, output_fd: int, status_fd: int) -> NoReturn:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self._selector.close()
            for fd in (self._wake_r, self._wake_w, status_fd, *self._status_fds.values()):
                os.close(fd)
            self._control.close()
            redirect_output(output_fd)
            if plan.resources is not None:
                # Its own plan's: they may have changed since the template loaded (a plan
                # applied live gives the workers started after it other threads).
                apply_resources(Resources.from_dict(plan.resources))
            worker.serve(self._spec.to_dict(), self._spec.label(), self._predict, plan.options())
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            fd = self._status_fds.pop(pid, None)
            if fd is not None:
                os.write(fd, EXIT_STATUS.pack(os.waitstatus_to_exitcode(status)))
                os.close(fd)
            self._exit_when_childless()

    def _exit_when_childless(self) -> None:
        if self._closing and not self._status_fds:
            os._exit(0)
