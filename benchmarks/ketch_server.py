"""``ketch serve`` on a models file the benchmark writes itself, watched through its stdout.

The pool benchmarks need more than :class:`~server_process.ServerProcess` gives: after
``ketch: ready`` they keep reading the lines that say when a pool grows and shrinks::

    ketch: model double:1 ready: worker pid 123 on HOST (double:1)
    ketch: model double:1 lost worker pid 123 on HOST (double:1): scaled down after 0.3 s ...

and they read ``GET /models``. Every wait has a deadline; none is a sleep.
"""

from __future__ import annotations

import http.client
import json
import queue
import re
import shutil
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from server_process import ServerError, ServerProcess

MODELS_FILE = "models.py"
#: ``ketch: model NAME:VERSION ready: worker pid N on HOST (...)``
WORKER_READY = re.compile(r"^ketch: model (?P<label>\S+) ready: worker pid (?P<pid>\d+) ")
#: ``ketch: model NAME:VERSION lost worker pid N on HOST (...): REASON``
WORKER_LOST = re.compile(
    r"^ketch: model (?P<label>\S+) lost worker pid (?P<pid>\d+) on \S+ \([^)]*\): (?P<reason>.*)$"
)
#: What the pool manager says when it lets an idle worker go.
SCALED_DOWN = "scaled down"
#: How long ``GET /models`` may take.
STATUS_TIMEOUT_S = 10.0


def ketch_executable() -> str:
    """The ``ketch`` console script beside this interpreter (so the server runs on the same
    Python as the benchmark), else the one on PATH."""
    beside = Path(sys.executable).with_name("ketch")
    found = str(beside) if beside.exists() else shutil.which("ketch")
    if found is None:
        raise ServerError("no `ketch` command found; install ketch with `pip install -e .`")
    return found


def write_models(directory: Path, source: str) -> Path:
    """Write ``source`` (dedented) as the models file in ``directory`` and return its path."""
    path = directory / MODELS_FILE
    path.write_text(textwrap.dedent(source).lstrip())
    return path


class KetchServer(ServerProcess):
    """``ketch serve MODELS_FILE`` on a free HTTP port and a free broker port.

    :param models_file: the file to serve; the server runs in its directory.
    :param extra_args: more ``ketch serve`` options.
    """

    def __init__(self, models_file: Path, extra_args: tuple[str, ...] = ()) -> None:
        command = [
            ketch_executable(),
            "serve",
            models_file.name,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--grpc-port",
            "0",
            "--broker",
            "tcp://127.0.0.1:*",
            *extra_args,
        ]
        super().__init__("ketch", command, cwd=models_file.parent)
        self.base_url = ""

    def start(self, timeout_s: float) -> str:
        """Wait for ``ketch: ready`` (after entering the context) and return the base URL."""
        self.base_url = self.wait_ready(timeout_s)
        return self.base_url

    def next_line(self, timeout_s: float) -> str | None:
        """The next stdout line, or None when none came within ``timeout_s``.

        Raises :class:`ServerError` once the server has exited and every line was read.
        """
        try:
            line = self._lines.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None
        if line is None:
            self._lines.put(None)  # every later call sees the end too
            raise ServerError(f"{self.name} exited\n{self.diagnostics()}")
        return line

    def wait_for(
        self, pattern: re.Pattern[str], timeout_s: float, seen: list[str] | None = None
    ) -> re.Match[str]:
        """Read lines until one matches ``pattern``; append every line read to ``seen``.

        A worker lost for any reason but a scale-down, or a model marked unhealthy, raises
        :class:`ServerError`: the pool is not doing what the benchmark measures.
        """
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            line = self.next_line(remaining)
            if line is None:
                break
            if seen is not None:
                seen.append(line)
            if match := pattern.search(line):
                return match
            lost = WORKER_LOST.match(line)
            if (lost and SCALED_DOWN not in lost["reason"]) or " unhealthy: " in line:
                raise ServerError(f"{self.name}: {line}\n{self.diagnostics()}")
        raise ServerError(
            f"{self.name} printed no line matching {pattern.pattern!r} within {timeout_s:g} s"
            f"\n{self.diagnostics()}"
        )

    def model_status(self, name: str) -> dict[str, Any]:
        """The entry of model ``name`` in ``GET /models`` (its default version)."""
        url = f"{self.base_url}/models"
        try:
            with urllib.request.urlopen(url, timeout=STATUS_TIMEOUT_S) as response:
                payload = json.loads(response.read())
        except (OSError, ValueError) as exc:
            raise ServerError(f"GET {url} failed: {exc}") from exc
        for entry in payload.get("models", []):
            if entry.get("name") == name and entry.get("default"):
                return dict(entry)
        raise ServerError(f"GET {url} lists no model {name!r}: {payload}")


def single_input_latencies(url: str, model: str, inputs: list[Any], count: int) -> list[float]:
    """Seconds each of ``count`` sequential one-input predictions of ``model`` took, on one
    keep-alive connection, cycling through ``inputs``; raises on any answer but 200."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    path = f"/models/{model}/predict"
    latencies = []
    try:
        for i in range(count):
            body = json.dumps({"input": inputs[i % len(inputs)]})
            start = time.perf_counter()
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            latencies.append(time.perf_counter() - start)
            if response.status != 200:
                raise ServerError(f"ketch answered {response.status}: {payload[:200]!r}")
    finally:
        connection.close()
    return latencies
