"""Fixtures that run ketch as users do: real `ketch serve` and `ketch worker` processes on
loopback, waited for through the lines they print, and always cleaned up."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.redis_server import RedisServer

#: Short heartbeats, so a silent worker is noticed within a second, yet enough of them
#: (10) that a gateway starved of CPU by a test's burst of process starts drops no one.
TEST_HEARTBEAT = ["--heartbeat-interval", "0.1", "--heartbeat-liveness", "10"]
START_DEADLINE_S = 60.0
#: How the gateway reports a worker killed by SIGKILL: by its supervisor (the exit status) or,
#: when a heartbeat reaches the dead worker's socket first, by the broker.
KILLED_REASON = r"(killed by SIGKILL|cannot deliver to it)"

# Every `ketch serve` a test starts (and those they start) takes a free gRPC port, not
# Triton's 8001, which two servers of one test would share; `--grpc-port` still overrides it.
os.environ.setdefault("KETCH_GRPC_PORT", "0")


class KetchProcess:
    """A `ketch` subprocess in its own process group, with its stdout read line by line."""

    def __init__(
        self, args: list[str], cwd: Path | None = None, prefix: Sequence[str] = ()
    ) -> None:
        """:param prefix: a command that runs the process, e.g. ``ip netns exec NAME``."""
        self.args = args
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "ketch.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            start_new_session=True,  # its workers share its group: one killpg cleans up all
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.stderr_lines: list[str] = []
        self._stderr_changed = threading.Condition()
        self._stderr_closed = False
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.lines)),
            threading.Thread(target=self._collect_stderr),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, sink: queue.Queue[str | None]) -> None:
        with stream:
            for line in stream:
                sink.put(line.rstrip("\n"))
        sink.put(None)

    def _collect_stderr(self) -> None:
        assert self.process.stderr is not None
        with self.process.stderr:
            for line in self.process.stderr:
                with self._stderr_changed:
                    self.stderr_lines.append(line.rstrip("\n"))
                    self._stderr_changed.notify_all()
        with self._stderr_changed:
            self._stderr_closed = True
            self._stderr_changed.notify_all()

    def wait_for_stderr(self, pattern: str, timeout: float = START_DEADLINE_S) -> re.Match[str]:
        """The first line on stderr matching ``pattern`` (where `ketch serve` forwards what its
        workers print), waiting for it up to ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        checked = 0
        with self._stderr_changed:
            while True:
                for line in self.stderr_lines[checked:]:
                    if match := regex.search(line):
                        return match
                checked = len(self.stderr_lines)
                remaining = deadline - time.monotonic()
                if self._stderr_closed or remaining <= 0:
                    break
                self._stderr_changed.wait(remaining)
        pytest.fail(
            f"ketch {' '.join(self.args)} printed no /{pattern}/ on stderr within {timeout} s; "
            f"stderr: {self.stderr_lines[-20:]}"
        )

    def wait_for(
        self, pattern: str, timeout: float = START_DEADLINE_S, *, seen_too: bool = False
    ) -> re.Match[str]:
        """The first line matching ``pattern`` from now on (or, with ``seen_too``, among those
        already read); fails at the deadline or when the process exits."""
        regex = re.compile(pattern)
        if seen_too:
            for line in self.seen:
                if match := regex.search(line):
                    return match
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                self.process.wait(5)
                pytest.fail(
                    f"ketch {' '.join(self.args)} exited ({self.process.returncode}) before "
                    f"printing /{pattern}/; stdout: {self.seen}; stderr: {self.stderr_lines[-20:]}"
                )
            self.seen.append(line)
            match = regex.search(line)
            if match:
                return match
        pytest.fail(
            f"ketch {' '.join(self.args)} printed no /{pattern}/ within {timeout} s; "
            f"stdout: {self.seen}; stderr: {self.stderr_lines[-20:]}"
        )

    def stop(self) -> int:
        """SIGINT, as Ctrl-C would; kill the whole group if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(5)
        for reader in self._readers:
            reader.join(5)
        return self.process.returncode


class KetchServer(KetchProcess):
    """`ketch serve` on an ephemeral HTTP port and an ephemeral broker port."""

    def __init__(self, source: str | Path | None, *extra: str, cwd: Path | None = None) -> None:
        super().__init__(
            [
                "serve",
                *([] if source is None else [str(source)]),
                "--port",
                "0",
                "--broker",
                "tcp://127.0.0.1:*",
                *TEST_HEARTBEAT,
                *extra,
            ],
            cwd=cwd,
        )
        self.client = httpx.Client(timeout=30)
        #: ``HOST:PORT`` of the gRPC service, once ready ("" when the server runs none).
        self.broker = self.url = self.grpc = ""

    def wait_ready(self) -> KetchServer:
        self.broker = self.wait_for(r"broker listening on (\S+)").group(1)
        self.url = self.wait_for(r"listening on (http://\S+)").group(1)
        self.wait_for(r"^ketch: ready$")
        said = (re.search(r"grpc listening on (\S+)", line) for line in self.seen)
        self.grpc = next((found.group(1) for found in said if found is not None), "")
        self.client.base_url = httpx.URL(self.url)
        return self

    def predict(self, model: str, body: Any) -> httpx.Response:
        return self.client.post(f"/models/{model}/predict", json=body)

    def model_status(self, name: str, version: str | None = None) -> dict[str, Any]:
        models = self.client.get("/models").json()["models"]
        for entry in models:
            if entry["name"] == name and (version is None or entry["version"] == version):
                return entry  # type: ignore[no-any-return]
        raise AssertionError(f"model {name}:{version} not in GET /models: {models}")

    def stop(self) -> int:
        self.client.close()
        return super().stop()


@pytest.fixture(scope="session")
def broker_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of CURVE keys written by `ketch keygen`, for gateways and the workers started
    by hand that join them (``--broker-keys``)."""
    folder = tmp_path_factory.mktemp("keys") / "broker"
    done = subprocess.run(
        [sys.executable, "-m", "ketch.cli.main", "keygen", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return folder


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Servers keep their applications' state in a folder of the test's, never the user's."""
    folder = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("KETCH_STATE_DIR", str(folder))
    return folder


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real ``redis-server`` of the test's own on 127.0.0.1, stopped afterwards."""
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def write_models(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a models file into the test's temporary folder and return its path."""

    def write(source: str, name: str = "models.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return path

    return write


@pytest.fixture
def start_server() -> Iterator[Callable[..., KetchServer]]:
    """Start `ketch serve` and wait for its READY; every server is stopped afterwards, also
    when the test (or the wait) fails."""
    started: list[KetchServer] = []

    def start(source: str | Path, *extra: str) -> KetchServer:
        server = KetchServer(source, *extra)
        started.append(server)
        return server.wait_ready()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def start_worker() -> Iterator[Callable[..., KetchProcess]]:
    """Start `ketch worker` processes by hand, as on another machine; all stopped afterwards."""
    started: list[KetchProcess] = []

    def start(target: str, broker: str, *extra: str, prefix: Sequence[str] = ()) -> KetchProcess:
        process = KetchProcess(
            ["worker", target, "--connect", broker, *TEST_HEARTBEAT, *extra], prefix=prefix
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
