"""Start a server under test, wait for its ready line, and always stop it and all it started.

A server (``ketch serve`` or the baseline) runs in its own process group, so the workers it
starts can be found and, if it leaves any behind, killed. Readiness is the ``ketch: ready`` line
on its stdout, waited for with a deadline, never guessed with a sleep.
"""

from __future__ import annotations

import math
import os
import queue
import select
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from procstat import group_cpu_seconds, group_members

READY_LINE = "ketch: ready"
LISTENING_PREFIX = "ketch: listening on "
#: How long a server gets to exit after SIGINT before its process group is killed.
STOP_TIMEOUT_S = 15.0
#: How long the processes left in a server's group may take to exit after the server did.
HELPER_EXIT_TIMEOUT_S = 5.0


class ServerError(Exception):
    """The server did not start or become ready; the message carries its last output."""


def wait_gone(pids: Sequence[int], timeout_s: float) -> list[int]:
    """Wait until the given processes (not our children) exit; return those still running.

    A pidfd becomes readable when its process exits, so this waits on events, not a poll loop.
    """
    poller = select.poll()
    pidfds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue  # already gone
            except OSError:  # no pidfd support (kernel < 5.3): cannot wait, so report them
                return list(pids)
            pidfds[fd] = pid
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout_s
        while pidfds and (remaining := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(math.ceil(remaining * 1000)):
                poller.unregister(fd)
                os.close(fd)
                del pidfds[fd]
        return sorted(pidfds.values())
    finally:
        for fd in pidfds:
            os.close(fd)


class ServerProcess:
    """A server started in its own process group, read line by line, always stopped on exit.

    :param name: what to call it in messages.
    :param command: the command line that starts it.
    :param cwd: the directory to start it in.
    """

    def __init__(self, name: str, command: Sequence[str], cwd: Path) -> None:
        self.name = name
        self.command = list(command)
        self.cwd = cwd
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # closed in stop()
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stdout_tail: deque[str] = deque(maxlen=40)
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        #: Set by stop(): the server's exit code, and what went wrong while stopping it.
        self.exit_code: int | None = None
        self.stop_warnings: list[str] = []

    @property
    def pgid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._process.pid  # a session leader's process group id is its pid

    def __enter__(self) -> ServerProcess:
        try:
            self._process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                text=True,
                start_new_session=True,
            )
        except OSError as exc:
            self._stderr.close()
            raise ServerError(f"cannot start {self.command}: {exc}") from exc
        # Keep draining stdout after the ready line too, so the server never blocks on a pipe.
        self._reader = threading.Thread(
            target=self._read_stdout,
            args=(self._process,),
            name=f"{self.name}-stdout",
            daemon=True,  # never keeps the benchmark alive if a stray process holds the pipe
        )
        self._reader.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _read_stdout(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._stdout_tail.append(line)
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_ready(self, timeout_s: float) -> str:
        """Return the base URL (``http://host:port``) once the server has printed its ready line."""
        deadline = time.monotonic() + timeout_s
        base_url: str | None = None
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise ServerError(
                    f"{self.name} printed no {READY_LINE!r} line within {timeout_s:g} s "
                    f"(does it flush stdout?)\n{self.diagnostics()}"
                ) from None
            if line is None:
                raise ServerError(f"{self.name} exited before it was ready\n{self.diagnostics()}")
            if line.startswith(LISTENING_PREFIX):
                base_url = line.removeprefix(LISTENING_PREFIX).strip().rstrip("/")
            elif line.strip() == READY_LINE:
                if base_url is None:
                    raise ServerError(
                        f"{self.name} was ready but printed no {LISTENING_PREFIX!r} line first"
                        f"\n{self.diagnostics()}"
                    )
                return base_url

    def cpu_seconds(self) -> float | None:
        return group_cpu_seconds(self.pgid)

    def diagnostics(self) -> str:
        self._stderr.seek(0)
        stderr = self._stderr.read().decode(errors="replace").splitlines()[-40:]
        return (
            f"--- last stdout lines of {self.name} ---\n{''.join(self._stdout_tail)}"
            f"--- last stderr lines of {self.name} ---\n" + "\n".join(stderr)
        )

    def stop(self) -> None:
        """SIGINT the server, wait, then kill what is left of its group. Idempotent."""
        process, warnings = self._process, self.stop_warnings
        if process is None:
            return
        self._process = None
        pgid = process.pid
        try:
            if process.poll() is None:
                # SIGINT goes to the server alone, as a supervisor would send it: stopping its
                # own workers is its job, and the check below tells whether it did.
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    warnings.append(f"did not exit {STOP_TIMEOUT_S:g} s after SIGINT; killed")
                    os.killpg(pgid, signal.SIGKILL)
                    process.wait()
                else:
                    if process.returncode != 0:
                        warnings.append(f"exited with code {process.returncode} after SIGINT")
            # Helpers such as multiprocess' forkserver and resource tracker exit only once they
            # see their parent gone, so give them a moment before calling them leftovers.
            running = [pid for pid, state, _ in group_members(pgid) if state != "Z"]
            leftovers = wait_gone(running, HELPER_EXIT_TIMEOUT_S)
            if leftovers:
                warnings.append(
                    f"left processes {leftovers} running {HELPER_EXIT_TIMEOUT_S:g} s after it "
                    "exited; killed them"
                )
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        finally:
            # The group is gone, so stdout reaches EOF and the reader ends; the timeout covers
            # a process that left the group while holding the pipe.
            if self._reader is not None:
                self._reader.join(HELPER_EXIT_TIMEOUT_S)
            if process.stdout is not None and (self._reader is None or not self._reader.is_alive()):
                process.stdout.close()
            self._stderr.close()
        self.exit_code = process.returncode
