"""The worker side of the protocol: a DEALER that serves one model version.

The main thread owns the socket and does everything on the request path (receive a REQUEST,
run the model, send the REPLY), so a request crosses no thread hand-off inside the worker.
While the model computes, the main thread lends the socket to a **heartbeat** thread, under a
lock, so a long batch never silences the worker. ZeroMQ allows a socket to move between
threads this way: the lock is the full memory barrier it asks for.

Models run in the main thread because frameworks expect it and signals land there.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from ketch.zmq_transport.liveness import Heartbeat, peer_expired
from ketch.zmq_transport.protocol import (
    BatchError,
    BatchInputError,
    BatchOutputError,
    Command,
    Disconnect,
    ErrorKind,
    Failure,
    Frame,
    Predict,
    ProtocolError,
    Ready,
    Reply,
    Request,
    command_of,
    decode,
    encode,
    read,
    worth_zero_copy,
)
from ketch.zmq_transport.security import WorkerKeys
from ketch.zmq_transport.shared_arrays import SharedMappings, SharedPlace, shm_identity

log = logging.getLogger("ketch.worker")


#: Longest wait between two attempts to rejoin a broker that went away.
MAX_REJOIN_BACKOFF_S = 30.0


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How a worker joins its broker.

    :param broker: ZeroMQ endpoint of the gateway's broker, e.g. ``tcp://127.0.0.1:7070``.
    :param heartbeat: heartbeat interval and liveness, the same on both sides.
    :param rejoin: on losing the broker, reconnect and send READY again (workers started by
        hand) instead of exiting (workers that ``ketch serve`` started and will replace).
    :param capacity: batches the broker may send before getting their replies.
    :param keys: the broker's public key and this worker's CURVE pair; None for a broker
        started with ``--insecure-broker``.
    :param launch: the id the gateway gave this process when it started it, announced in
        READY so that it knows which of its starting processes joined (None: started by hand).
    :param node: the node of a cluster it was placed on (Ray's node id), announced in READY.
    """

    broker: str
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    rejoin: bool = False
    capacity: int = 1
    keys: WorkerKeys | None = None
    launch: str | None = None
    node: str | None = None


def serve(model: Mapping[str, Any], label: str, predict: Predict, options: WorkerOptions) -> None:
    """Serve one model version with ``predict`` until the broker says DISCONNECT or goes silent
    (or, with ``rejoin``, until interrupted).

    :param model: the model's spec as a map, announced in READY (the gateway decodes it).
    :param label: the model's ``name:version``, for log lines and error messages.
    """
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    link = _Link(context, options, _ready_header(model, options))
    try:
        while (frames := link.next_request()) is not None:
            with link.lent_for_heartbeats():
                try:
                    reply = run_batch(frames, predict, label)
                except (ProtocolError, KeyError) as exc:
                    # Without a readable batch id there is no one to answer; the broker's
                    # request times out. Keep serving the well-formed ones.
                    log.error("ignoring a malformed REQUEST: %r", exc)
                    continue
            link.send(reply)
    finally:
        link.close()
        context.term()


#: This worker's mappings of the shared-memory objects that inputs lie in.
_SHARED = SharedMappings()


def run_batch(frames: Sequence[bytes], predict: Predict, label: str) -> list[Frame]:
    """Decode one REQUEST, run it, and return the encoded REPLY or ERROR (with envelope)."""
    request = read(decode(frames), Request)
    batch_id = request.id
    started = time.perf_counter()
    inputs = request.inputs
    if isinstance(inputs, SharedPlace):
        try:
            inputs = _SHARED.array(inputs)
        except (OSError, ValueError) as exc:
            return _error(batch_id, ErrorKind.BAD_INPUT, BatchInputError(f"model {label!r}: {exc}"))
    try:
        outputs = predict(inputs, request.params)
    except BatchError as exc:
        return _error(batch_id, exc.kind, exc)
    except Exception as exc:
        log.debug("model %s raised", label, exc_info=True)
        return _error(batch_id, ErrorKind.MODEL, exc)
    try:
        compute_s = time.perf_counter() - started
        reply = Reply(id=batch_id, outputs=outputs, compute_s=compute_s)
        return encode(Command.REPLY, reply)
    except (TypeError, ValueError) as exc:
        return _error(batch_id, ErrorKind.BAD_OUTPUT, BatchOutputError(f"model {label!r}: {exc}"))


def _error(batch_id: int, kind: ErrorKind, exc: BaseException) -> list[Frame]:
    failure = Failure(id=batch_id, kind=kind, type=type(exc).__name__, message=str(exc))
    return encode(Command.ERROR, failure)


def _ready_header(model: Mapping[str, Any], options: WorkerOptions) -> Ready:
    return Ready(
        model=dict(model),
        pid=os.getpid(),
        host=socket.gethostname(),
        capacity=options.capacity,
        heartbeat_ms=options.heartbeat.interval_s * 1000,
        shm=shm_identity(),
        launch=options.launch,
        node=options.node,
    )


class _Link:
    """The worker's DEALER socket: READY, heartbeats both ways, rejoining a lost broker."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        options: WorkerOptions,
        ready: Ready,
    ) -> None:
        self._context = context
        self._options = options
        self._ready = ready
        self._backoff = 1.0
        self._refusals = 0
        self._handshake: zmq.Socket[bytes] | None = None
        self._lock = threading.Lock()
        self._lock.acquire()  # the main thread holds the socket unless it lends it
        self._closed = threading.Event()
        self._dealer = self._join()
        self._last_heard = self._last_sent = time.monotonic()
        self._heartbeats = threading.Thread(
            target=self._beat_while_lent, name="ketch-heartbeat", daemon=True
        )
        self._heartbeats.start()

    def next_request(self) -> list[bytes] | None:
        """Wait for the next REQUEST (heartbeating meanwhile); None when the worker must stop."""
        heartbeat = self._options.heartbeat
        while True:
            now = time.monotonic()
            wait_ms = int(max(0.0, self._last_sent + heartbeat.interval_s - now) * 1000) + 1
            if self._handshake is not None:
                if self._handshake_refused(wait_ms):
                    if not self._options.rejoin:
                        return None
                    self._rejoin(delay_s=self._refusal_backoff())
                    continue
                wait_ms = 0  # waited already, for the handshake and the DEALER at once
            if self._dealer.poll(wait_ms, zmq.POLLIN):
                self._last_heard = time.monotonic()
                frames = self._dealer.recv_multipart()
                if _is_request(frames):
                    self._heard_as_admitted()
                    return frames
                verdict = self._handle_broker(frames)
                if verdict is _Verdict.STAY:
                    self._heard_as_admitted()
                    continue
                if verdict is _Verdict.REFUSED:
                    if not self._options.rejoin:
                        return None
                    self._rejoin(delay_s=self._refusal_backoff())
                    continue
                lost = True
            else:
                lost = peer_expired(
                    self._last_heard, time.monotonic(), _scaled(heartbeat, self._backoff)
                )
                if lost:
                    log.warning("broker at %s is silent", self._options.broker)
            if lost:
                if not self._options.rejoin:
                    return None
                self._rejoin()
            elif time.monotonic() - self._last_sent >= heartbeat.interval_s:
                self._send_heartbeat()

    def _heard_as_admitted(self) -> None:
        # Admitted and heard from: the next loss or refusal starts its back-off afresh.
        self._backoff = 1.0
        self._refusals = 0

    def send(self, frames: list[Frame]) -> None:
        try:
            self._dealer.send_multipart(frames, zmq.NOBLOCK, copy=not worth_zero_copy(frames))
        except zmq.Again:
            # No way to the broker right now; it retries the batch elsewhere when this worker
            # goes silent, so a reply is never worth blocking the worker for.
            log.warning("dropped a reply: the broker at %s is unreachable", self._options.broker)
            return
        self._last_sent = time.monotonic()

    @contextlib.contextmanager
    def lent_for_heartbeats(self) -> Iterator[None]:
        """Let the heartbeat thread use the socket while the main thread computes."""
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            # Busy is not silent: what the broker sent meanwhile is read on the next poll.
            self._last_heard = max(self._last_heard, time.monotonic())

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(zmq.ZMQError):
            self._dealer.send_multipart(encode(Command.DISCONNECT, {}), zmq.NOBLOCK)
        self._lock.release()
        self._heartbeats.join()
        self._close_dealer()

    def _beat_while_lent(self) -> None:
        interval = self._options.heartbeat.interval_s
        while not self._closed.wait(interval):
            # Only gets the lock while the main thread computes (or has closed the link).
            with self._lock:
                if self._closed.is_set():
                    return
                if time.monotonic() - self._last_sent >= interval:
                    self._send_heartbeat()

    def _send_heartbeat(self) -> None:
        # A heartbeat that cannot be queued is not worth waiting for: silence says the same.
        with contextlib.suppress(zmq.Again):
            self._dealer.send_multipart(encode(Command.HEARTBEAT), zmq.NOBLOCK)
        self._last_sent = time.monotonic()

    def _join(self) -> zmq.Socket[bytes]:
        dealer = self._context.socket(zmq.DEALER)
        if self._options.keys is not None:
            self._options.keys.apply(dealer)
        # Watched until the handshake ends: a broker that refuses this worker's keys closes
        # the connection for good, which from here would otherwise look like a silent broker.
        self._handshake = dealer.get_monitor_socket(HANDSHAKE_EVENTS)
        dealer.connect(self._options.broker)
        # Queued at once: a connecting socket holds messages until the handshake is done.
        dealer.send_multipart(encode(Command.READY, self._ready), zmq.NOBLOCK)
        return dealer

    def _rejoin(self, delay_s: float = 0.0) -> None:
        """Reconnect with a new identity and send READY again; back off while it fails."""
        self._close_dealer()
        if delay_s > 0:
            # Back-off, not a wait for the broker: nothing can arrive while disconnected.
            self._closed.wait(delay_s)
        self._dealer = self._join()
        self._last_heard = self._last_sent = time.monotonic()
        timeout_s = self._options.heartbeat.timeout_s
        self._backoff = min(self._backoff * 2, MAX_REJOIN_BACKOFF_S / timeout_s)

    def _close_dealer(self) -> None:
        self._stop_watching_handshake()
        self._dealer.close(linger=0)

    def _stop_watching_handshake(self) -> None:
        if self._handshake is not None:
            self._dealer.disable_monitor()
            self._handshake.close(linger=0)
            self._handshake = None

    def _handshake_refused(self, timeout_ms: int) -> bool:
        """Wait up to ``timeout_ms`` for the handshake's outcome; True when the broker refused.

        Also returns (False) as soon as the DEALER has something to read."""
        assert self._handshake is not None
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._handshake, zmq.POLLIN)
        if self._handshake not in dict(poller.poll(timeout_ms)):
            return False
        while self._handshake.poll(0, zmq.POLLIN):
            event = recv_monitor_message(self._handshake)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._stop_watching_handshake()
                return False
            log.warning(
                "the broker at %s refused this worker: %s",
                self._options.broker,
                _refusal_reason(event, self._options.keys),
            )
            return True
        return False

    def _refusal_backoff(self) -> float:
        """Seconds before trying again after a refusal: 1, 2, 4 ... up to the rejoin cap."""
        self._refusals += 1
        delay_s = min(2.0 ** (self._refusals - 1), MAX_REJOIN_BACKOFF_S)
        log.info("trying to join again in %g s", delay_s)
        return delay_s

    def _handle_broker(self, frames: list[bytes]) -> _Verdict:
        """Act on one non-REQUEST broker message: whether the broker let this worker go."""
        command = command_of(frames)
        if command is None:
            log.warning("ignoring a malformed message from the broker")
            return _Verdict.STAY
        if command is not Command.DISCONNECT:
            return _Verdict.STAY
        try:
            disconnect = read(decode(frames), Disconnect)
        except ProtocolError:
            disconnect = Disconnect()
        if disconnect.refused:
            log.warning(
                "the gateway at %s refused this worker: %s",
                self._options.broker,
                disconnect.reason,
            )
            return _Verdict.REFUSED
        log.info("broker disconnected this worker: %s", disconnect.reason)
        return _Verdict.LEFT


class _Verdict(enum.Enum):
    """What a message from the broker means for this worker's link."""

    STAY = "stay"
    #: Disconnected: a started worker exits, one started by hand joins again.
    LEFT = "left"
    #: Its READY was refused: joining again at once would be refused again.
    REFUSED = "refused"


HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def _refusal_reason(event: int, keys: WorkerKeys | None) -> str:
    if keys is None:
        return "it speaks CURVE and this worker has no keys (give it --broker-keys DIR)"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            "this worker's public key is not among its authorized keys (the operator adds "
            "worker.key to the broker's authorized/ folder)"
        )
    return "the CURVE handshake failed: the server key this worker has is not the broker's"


def _is_request(frames: list[bytes]) -> bool:
    return command_of(frames) is Command.REQUEST


def _scaled(heartbeat: Heartbeat, factor: float) -> Heartbeat:
    """The broker-silence limit, stretched while rejoining so a down gateway is not hammered."""
    if factor == 1.0:
        return heartbeat
    return Heartbeat(heartbeat.interval_s * factor, heartbeat.liveness)
