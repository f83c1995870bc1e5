"""What worker processes print: forwarded to the gateway's stderr, and its tail kept.

Every worker's stdout and stderr go to a pipe the gateway reads. Each line is passed on to the
gateway's stderr with the worker's name in front, so ``print`` debugging in a model and
tracebacks still show where the operator looks; the last lines are kept so that when a worker
dies, the error a client gets and ``GET /models`` can say what it printed last.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from typing import TextIO

#: Lines of a worker's output kept for error messages, and the most characters of each.
TAIL_LINES = 12
_LINE_CHARS = 500


class OutputTail:
    """Reads one process's output pipe on the event loop.

    :param fd: read end of the pipe; owned (and closed) by this object.
    :param prefix: put in front of each forwarded line, e.g. ``double:1 pid 4242``.
    """

    def __init__(self, fd: int, prefix: str, sink: TextIO | None = None) -> None:
        self._fd = fd
        self._prefix = prefix
        self._sink = sink if sink is not None else sys.stderr
        self._partial = b""
        self._lines: deque[str] = deque(maxlen=TAIL_LINES)
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._read)
        self._open = True

    def _read(self) -> None:
        while self._open:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            if not data:
                self._finish()
                return
            *lines, self._partial = (self._partial + data).split(b"\n")
            for line in lines:
                self._emit(line)
            if len(self._partial) > 65536:  # a very long line without a newline
                self._emit(self._partial)
                self._partial = b""

    def _emit(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        self._lines.append(line if len(line) <= _LINE_CHARS else line[:_LINE_CHARS] + "...")
        print(f"[{self._prefix}] {line}", file=self._sink, flush=True)

    def _finish(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""
        self.close()

    def drain(self) -> None:
        """Read what the process left in the pipe (call once it has exited)."""
        self._read()

    def tail(self) -> str:
        """The last lines it printed, oldest first."""
        return "\n".join(self._lines)

    def close(self) -> None:
        if self._open:
            self._open = False
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
