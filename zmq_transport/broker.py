"""The gateway's side of the protocol: a ROUTER socket driven by the asyncio event loop.

The broker knows workers, not requests: it registers a worker on READY, keeps heartbeats going
both ways, drops a worker that goes silent, says DISCONNECT or is reported dead, and hands
replies to the :class:`BrokerEvents` it was given (the gateway's dispatcher), which owns the
queues, the batches and the retries.

The socket is a plain (blocking-API) ZeroMQ socket read from ``loop.add_reader`` with
non-blocking calls: it saves a future per message over ``zmq.asyncio``, which matters on the
request path. ZeroMQ's file descriptor is edge-triggered, so the socket is drained completely
on every wake-up and re-checked after every send (a send can consume the edge).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import zmq

from ketch.specs.models import ModelSpec
from ketch.types import Outputs
from ketch.zmq_transport.liveness import Heartbeat, peer_expired
from ketch.zmq_transport.protocol import (
    EMPTY,
    Command,
    ErrorKind,
    Message,
    ProtocolError,
    decode,
    encode,
    split_envelope,
)

log = logging.getLogger("ketch.broker")

#: Messages handled per wake-up before yielding to the event loop (fairness under load).
_DRAIN_LIMIT = 512
#: How long DISCONNECT messages may take to leave when the broker closes.
_CLOSE_LINGER_MS = 500


@dataclass(slots=True, eq=False)
class WorkerInfo:
    """A worker that has sent READY: which model version it serves and where it runs."""

    identity: bytes
    spec: ModelSpec
    pid: int
    host: str
    capacity: int
    last_heard: float = field(default_factory=time.monotonic)

    def describe(self) -> str:
        return f"worker pid {self.pid} on {self.host} ({self.spec.label()})"


@dataclass(frozen=True, slots=True)
class RemoteError:
    """A batch the worker could not compute, as reported in an ERROR message."""

    kind: ErrorKind
    type: str
    message: str


class BrokerEvents(Protocol):
    """What the broker reports; implemented by the gateway's dispatcher."""

    def worker_ready(self, worker: WorkerInfo) -> None: ...

    def worker_lost(self, worker: WorkerInfo, reason: str) -> None: ...

    def batch_replied(
        self, worker: WorkerInfo, batch_id: int, outputs: Outputs, compute_s: float | None
    ) -> None: ...

    def batch_failed(self, worker: WorkerInfo, batch_id: int, error: RemoteError) -> None: ...


class Broker:
    """ROUTER socket plus worker registry; see the module docstring.

    :param endpoint: where to bind, e.g. ``tcp://127.0.0.1:7070`` (``tcp://127.0.0.1:*`` picks a
        free port; :meth:`start` returns the bound endpoint).
    :param events: receiver of worker and batch events.
    :param heartbeat: heartbeat interval and liveness, the same the workers use.
    """

    def __init__(self, endpoint: str, events: BrokerEvents, heartbeat: Heartbeat) -> None:
        self.endpoint = endpoint
        self.heartbeat = heartbeat
        self._events = events
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket: zmq.Socket[bytes] | None = None
        self._workers: dict[bytes, WorkerInfo] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False
        self._heartbeat_task: asyncio.Task[None] | None = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> str:
        """Bind, start reading and heartbeating on the running loop; return the endpoint."""
        self._loop = asyncio.get_running_loop()
        sock = self._context.socket(zmq.ROUTER)
        # Raise instead of silently dropping a message to a worker that is gone.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise OSError(f"cannot bind the broker to {self.endpoint}: {exc.strerror}") from exc
        self._socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._loop.add_reader(_fd_of(sock), self._drain)
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="ketch-heartbeat")
        self._schedule_drain()
        return self.endpoint

    async def close(self) -> None:
        """Tell every worker DISCONNECT and close the socket."""
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        sock = self._socket
        if sock is None:
            return
        for worker in list(self._workers.values()):
            self._send(worker.identity, Command.DISCONNECT, {"reason": "gateway shutting down"})
        self._workers.clear()
        assert self._loop is not None
        self._loop.remove_reader(_fd_of(sock))
        self._socket = None
        sock.close(linger=_CLOSE_LINGER_MS)

    # -- used by the dispatcher -------------------------------------------------------------

    def workers(self) -> Iterator[WorkerInfo]:
        return iter(list(self._workers.values()))

    def send_batch(
        self, worker: WorkerInfo, batch_id: int, inputs: Sequence[Any] | np.ndarray
    ) -> bool:
        """Send one REQUEST; False (and the worker dropped) when it cannot be delivered."""
        try:
            frames = encode(Command.REQUEST, {"id": batch_id, "inputs": inputs})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"inputs cannot be sent to {worker.spec.label()}: {exc}") from exc
        return self._send_frames(worker.identity, frames)

    def drop(self, worker: WorkerInfo, reason: str) -> None:
        """Forget ``worker`` (telling it DISCONNECT) and report it lost; idempotent."""
        if self._workers.pop(worker.identity, None) is None:
            return
        self._send(worker.identity, Command.DISCONNECT, {"reason": reason})
        log.info("dropped %s: %s", worker.describe(), reason)
        self._events.worker_lost(worker, reason)

    # -- socket I/O -------------------------------------------------------------------------

    def _send(self, identity: bytes, command: Command, header: dict[str, Any]) -> bool:
        return self._send_frames(identity, encode(command, header))

    def _send_frames(self, identity: bytes, frames: list[Any]) -> bool:
        sock = self._socket
        if sock is None:
            return False
        try:
            sock.send_multipart([identity, EMPTY, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, zmq.EAGAIN):
                raise
            worker = self._workers.get(identity)
            if worker is not None:
                self.drop(worker, f"cannot deliver to it ({exc.strerror})")
            return False
        finally:
            if _readable(sock):
                self._schedule_drain()
        return True

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and self._loop is not None:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        sock = self._socket
        if sock is None:
            return
        for _ in range(_DRAIN_LIMIT):
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle(frames)
            except Exception:
                # One bad message or a bug in a handler must not stop the broker.
                log.exception("error while handling a worker message")
            if self._socket is None:
                return
        self._schedule_drain()

    def _handle(self, frames: list[bytes]) -> None:
        try:
            identity, body = split_envelope(frames)
        except ProtocolError as exc:
            log.warning("ignoring a malformed message: %s", exc)
            return
        worker = self._workers.get(identity)
        try:
            message = decode(body)
        except ProtocolError as exc:
            log.warning("bad message from %s: %s", worker.describe() if worker else "?", exc)
            if worker is not None:
                self.drop(worker, f"protocol error: {exc}")
            else:
                self._send(identity, Command.DISCONNECT, {"reason": f"protocol error: {exc}"})
            return
        if message.command is Command.READY:
            self._register(identity, message)
            return
        if worker is None:
            if message.command is not Command.DISCONNECT:
                # A worker this broker does not know (it restarted, or dropped the worker):
                # make it rejoin with READY or exit.
                self._send(identity, Command.DISCONNECT, {"reason": "unknown worker"})
            return
        worker.last_heard = time.monotonic()
        header = message.header
        if message.command is Command.REPLY:
            compute_s = header.get("compute_s")
            self._events.batch_replied(
                worker,
                header["id"],
                header["outputs"],
                float(compute_s) if isinstance(compute_s, int | float) else None,
            )
        elif message.command is Command.ERROR:
            error = RemoteError(ErrorKind(header["kind"]), header["type"], header["message"])
            self._events.batch_failed(worker, header["id"], error)
        elif message.command is Command.DISCONNECT:
            self._workers.pop(identity, None)
            self._events.worker_lost(worker, "the worker disconnected")

    def _register(self, identity: bytes, message: Message) -> None:
        header = message.header
        try:
            spec = ModelSpec.from_dict(header["model"])
            worker = WorkerInfo(
                identity, spec, int(header["pid"]), str(header["host"]), int(header["capacity"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            self._send(identity, Command.DISCONNECT, {"reason": f"invalid READY: {exc}"})
            return
        old = self._workers.pop(identity, None)
        if old is not None:
            self._events.worker_lost(old, "the worker registered again")
        self._workers[identity] = worker
        log.info("%s is ready", worker.describe())
        self._events.worker_ready(worker)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat.interval_s)  # a timer, not a wait for a peer
            now = time.monotonic()
            for worker in list(self._workers.values()):
                if peer_expired(worker.last_heard, now, self.heartbeat):
                    silent = now - worker.last_heard
                    self.drop(worker, f"no heartbeat for {silent:.1f} s")
                else:
                    self._send(worker.identity, Command.HEARTBEAT, {})


def _fd_of(sock: zmq.Socket[bytes]) -> int:
    return cast(int, sock.getsockopt(zmq.FD))


def _readable(sock: zmq.Socket[bytes]) -> bool:
    """Whether a message is waiting; also lets ZeroMQ process pending socket commands."""
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)
