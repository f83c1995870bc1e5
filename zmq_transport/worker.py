"""The worker side of the protocol: serve one model version to its brokers.

The main thread owns the sockets (:mod:`ketch.zmq_transport.links`: the worker's own broker,
and the other gateways' it is told of) and does everything on the request path (receive a
REQUEST, run the model, send the REPLY on the link it came on), so a request crosses no thread
hand-off inside the worker. While the model computes, the main thread lends the sockets to a
**heartbeat** thread, under a lock, so a long batch never silences the worker. ZeroMQ allows a
socket to move between threads this way: the lock is the full memory barrier it asks for.

Models run in the main thread because frameworks expect it and signals land there.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from ketch.zmq_transport.links import LinkOptions, Links
from ketch.zmq_transport.liveness import Heartbeat
from ketch.zmq_transport.protocol import (
    BatchError,
    BatchInputError,
    BatchOutputError,
    Command,
    ErrorKind,
    Failure,
    Frame,
    Predict,
    ProtocolError,
    Ready,
    Reply,
    Request,
    decode,
    encode,
    read,
)
from ketch.zmq_transport.security import WorkerKeys
from ketch.zmq_transport.shared_arrays import SharedMappings, SharedPlace, shm_identity

log = logging.getLogger("ketch.worker")


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
    links = Links(
        context,
        options.broker,
        _ready_header(model, options),
        LinkOptions(options.heartbeat, options.keys),
        rejoin=options.rejoin,
    )
    try:
        while (received := links.next_request()) is not None:
            link, frames = received
            with links.lent_for_heartbeats():
                try:
                    reply = run_batch(frames, predict, label)
                except (ProtocolError, KeyError) as exc:
                    # Without a readable batch id there is no one to answer; the broker's
                    # request times out. Keep serving the well-formed ones.
                    log.error("ignoring a malformed REQUEST: %r", exc)
                    continue
            link.send(reply)
    finally:
        links.close()
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
