"""The worker side of the protocol: a DEALER that serves one model version.

Two threads share the work so a long batch never silences the worker:

* the **link** thread owns the DEALER socket: it sends READY, exchanges heartbeats, notices a
  dead broker, hands REQUEST frames to the main thread and forwards finished replies;
* the **main** thread runs the model (frameworks expect the main thread, and signals land
  there), one batch at a time, and passes encoded replies back over an inproc PAIR socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from ketch.errors import BatchInputError, BatchOutputError
from ketch.models import ModelSpec
from ketch.types import Predict
from ketch.zmq_transport.liveness import Heartbeat, peer_expired
from ketch.zmq_transport.protocol import (
    EMPTY,
    PROTOCOL,
    Command,
    ErrorKind,
    Frame,
    ProtocolError,
    decode,
    encode,
)

log = logging.getLogger("ketch.worker")


#: Longest wait between two attempts to rejoin a broker that went away.
MAX_REJOIN_BACKOFF_S = 30.0
_STOP = b"stop"


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How a worker joins its broker.

    :param broker: ZeroMQ endpoint of the gateway's broker, e.g. ``tcp://127.0.0.1:7070``.
    :param heartbeat: heartbeat interval and liveness, the same on both sides.
    :param rejoin: on losing the broker, reconnect and send READY again (workers started by
        hand) instead of exiting (workers that ``ketch serve`` started and will replace).
    :param capacity: batches the broker may send before getting their replies.
    """

    broker: str
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    rejoin: bool = False
    capacity: int = 1


def serve(spec: ModelSpec, predict: Predict, options: WorkerOptions) -> None:
    """Serve ``spec`` with ``predict`` until the broker says DISCONNECT or goes silent (or,
    with ``rejoin``, until interrupted). Returns after the link is closed."""
    context = zmq.Context()
    jobs: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
    endpoint = f"inproc://ketch-worker-{id(jobs)}"
    link = _Link(context, options, _ready_header(spec, options), jobs, endpoint)
    results = context.socket(zmq.PAIR)
    results.connect(endpoint)
    link.start()
    try:
        while (frames := jobs.get()) is not None:
            try:
                reply = run_batch(frames, predict, spec.label())
            except (ProtocolError, KeyError) as exc:
                # Without a readable batch id there is no one to answer; the broker's
                # request times out. Keep serving the well-formed ones.
                log.error("ignoring a malformed REQUEST: %r", exc)
                continue
            try:
                results.send_multipart(reply, copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                break  # the link has gone: nobody left to send to
    finally:
        if link.is_alive():
            with contextlib.suppress(zmq.Again):
                results.send(_STOP, flags=zmq.NOBLOCK)
        link.join()
        results.close(linger=0)
        context.term()


def run_batch(frames: Sequence[bytes], predict: Predict, label: str) -> list[Frame]:
    """Decode one REQUEST, run it, and return the encoded REPLY or ERROR (with envelope)."""
    message = decode(frames[1:])
    batch_id = message.header["id"]
    try:
        outputs = predict(message.header["inputs"])
    except BatchInputError as exc:
        return _error(batch_id, ErrorKind.BAD_INPUT, exc)
    except BatchOutputError as exc:
        return _error(batch_id, ErrorKind.BAD_OUTPUT, exc)
    except Exception as exc:
        log.debug("model %s raised", label, exc_info=True)
        return _error(batch_id, ErrorKind.MODEL, exc)
    try:
        return [EMPTY, *encode(Command.REPLY, {"id": batch_id, "outputs": outputs})]
    except (TypeError, ValueError) as exc:
        return _error(batch_id, ErrorKind.BAD_OUTPUT, BatchOutputError(f"model {label!r}: {exc}"))


def _error(batch_id: int, kind: ErrorKind, exc: BaseException) -> list[Frame]:
    header = {"id": batch_id, "kind": kind.value, "type": type(exc).__name__, "message": str(exc)}
    return [EMPTY, *encode(Command.ERROR, header)]


def _ready_header(spec: ModelSpec, options: WorkerOptions) -> dict[str, Any]:
    return {
        "model": spec.to_dict(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "capacity": options.capacity,
        "heartbeat_ms": int(options.heartbeat.interval_s * 1000),
    }


class _Link(threading.Thread):
    """Owns the DEALER socket; see the module docstring."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        options: WorkerOptions,
        ready: dict[str, Any],
        jobs: queue.SimpleQueue[list[bytes] | None],
        results_endpoint: str,
    ) -> None:
        super().__init__(name="ketch-worker-link", daemon=True)
        self._context = context
        self._options = options
        self._ready = ready
        self._jobs = jobs
        self._results = context.socket(zmq.PAIR)
        self._results.bind(results_endpoint)

    def run(self) -> None:
        heartbeat = self._options.heartbeat
        backoff = 1.0
        dealer = self._join()
        last_heard = last_sent = time.monotonic()
        poller = zmq.Poller()
        poller.register(self._results, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        try:
            while True:
                timeout_ms = max(0.0, last_sent + heartbeat.interval_s - time.monotonic()) * 1000
                events = dict(poller.poll(int(timeout_ms)))
                now = time.monotonic()
                if self._results in events:
                    frames = self._results.recv_multipart(copy=False)
                    if frames[0].bytes == _STOP:
                        dealer.send_multipart([EMPTY, *encode(Command.DISCONNECT, {})])
                        return
                    dealer.send_multipart(frames, copy=False)
                    last_sent = now
                lost = False
                if dealer in events:
                    last_heard = now
                    backoff = 1.0
                    lost = self._handle_broker(dealer.recv_multipart())
                if not lost and peer_expired(last_heard, now, _scaled(heartbeat, backoff)):
                    log.warning("broker at %s is silent", self._options.broker)
                    lost = True
                if lost:
                    if not self._options.rejoin:
                        return
                    poller.unregister(dealer)
                    dealer.close(linger=0)
                    dealer = self._join()
                    poller.register(dealer, zmq.POLLIN)
                    last_heard = last_sent = time.monotonic()
                    backoff = min(backoff * 2, MAX_REJOIN_BACKOFF_S / heartbeat.timeout_s)
                    continue
                if now - last_sent >= heartbeat.interval_s:
                    dealer.send_multipart([EMPTY, *encode(Command.HEARTBEAT)])
                    last_sent = now
        finally:
            self._jobs.put(None)
            dealer.close(linger=0)
            self._results.close(linger=0)

    def _join(self) -> zmq.Socket[bytes]:
        dealer = self._context.socket(zmq.DEALER)
        dealer.connect(self._options.broker)
        dealer.send_multipart([EMPTY, *encode(Command.READY, self._ready)])
        return dealer

    def _handle_broker(self, frames: list[bytes]) -> bool:
        """Act on one broker message; True when the broker has let this worker go."""
        if len(frames) < 3 or frames[0] != EMPTY or frames[1] != PROTOCOL:
            log.warning("ignoring a malformed message from the broker")
            return False
        command = frames[2]
        if command == Command.REQUEST.value:
            self._jobs.put(frames)
        elif command == Command.DISCONNECT.value:
            try:
                reason = decode(frames[1:]).header.get("reason", "")
            except ProtocolError:
                reason = ""
            log.info("broker disconnected this worker: %s", reason)
            return True
        return False


def _scaled(heartbeat: Heartbeat, factor: float) -> Heartbeat:
    """The broker-silence limit, stretched while rejoining so a down gateway is not hammered."""
    if factor == 1.0:
        return heartbeat
    return Heartbeat(heartbeat.interval_s * factor, heartbeat.liveness)
