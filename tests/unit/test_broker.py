"""The broker on a real ROUTER socket (``tcp://127.0.0.1:*``), with a raw DEALER socket in the
test playing the worker: registration by READY, DISCONNECT for what it refuses, heartbeats at
each worker's own interval, silent and departed workers reported lost, replies routed."""

from __future__ import annotations

import asyncio
import contextlib
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import zmq
import zmq.asyncio

from ketch.serving.sink import Worker
from ketch.specs.models import ModelSpec
from ketch.zmq_transport.broker import Broker, RemoteError
from ketch.zmq_transport.liveness import Heartbeat
from ketch.zmq_transport.protocol import Command, ErrorKind, Message, decode, encode
from ketch.zmq_transport.security import BrokerKeys, KeyPair, WorkerKeys
from tests.unit.fakes import in_loop, make_spec

#: How long a test waits for a message or an event before it fails.
WAIT_S = 2.0


class Recorder:
    """BrokerEvents that keeps every event, in order, as ``(kind, *arguments)``."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self._new = asyncio.Queue[tuple[Any, ...]]()
        #: What :meth:`admit` answers: None admits every worker.
        self.refusal: str | None = None

    def _record(self, *event: Any) -> None:
        self.seen.append(event)
        self._new.put_nowait(event)

    async def next(self) -> tuple[Any, ...]:
        return await asyncio.wait_for(self._new.get(), WAIT_S)

    def admit(self, worker: Worker) -> str | None:
        return self.refusal

    def ready_invalid(self, reason: str) -> None:
        self._record("invalid", reason)

    def worker_ready(self, worker: Worker) -> None:
        worker.receiver = self  # as the dispatcher places a worker in its queue
        self._record("ready", worker)

    def worker_lost(self, worker: Worker, reason: str) -> None:
        self._record("lost", worker, reason)

    def batch_replied(
        self, worker: Worker, batch_id: int, outputs: Any, compute_s: float | None
    ) -> None:
        self._record("replied", worker, batch_id, outputs, compute_s)

    def batch_failed(self, worker: Worker, batch_id: int, error: RemoteError) -> None:
        self._record("failed", worker, batch_id, error)

    def peer_refused(self, host: str, reason: str, first: bool) -> None:
        self._record("refused", host, reason, first)


class Peer:
    """A worker's DEALER socket, driven by hand."""

    def __init__(
        self, context: zmq.asyncio.Context, endpoint: str, keys: WorkerKeys | None
    ) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.apply(self.socket)
        self.socket.connect(endpoint)

    async def send(self, command: Command, header: dict[str, Any] | None = None) -> None:
        await self.socket.send_multipart(encode(command, header))

    async def ready(self, spec: ModelSpec | None = None, **header: Any) -> None:
        model = (spec or make_spec()).to_dict()
        await self.send(
            Command.READY, {"model": model, "pid": 321, "host": "box", "capacity": 2, **header}
        )

    async def receive(self, timeout_s: float = WAIT_S) -> Message:
        frames = await asyncio.wait_for(self.socket.recv_multipart(), timeout_s)
        return decode(frames)


class Harness:
    def __init__(
        self,
        broker: Broker[ModelSpec],
        keys: BrokerKeys,
        events: Recorder,
        context: zmq.asyncio.Context,
    ) -> None:
        self.broker = broker
        self.keys = keys
        self.events = events
        self._context = context

    def peer(
        self, endpoint: str | None = None, keys: WorkerKeys | Literal["trusted"] | None = "trusted"
    ) -> Peer:
        """A peer on ``endpoint`` (the broker's configured one by default) with ``keys`` (by
        default the ones the broker gives the workers it starts)."""
        if keys == "trusted":
            keys = self.keys.local_worker_keys()
        return Peer(self._context, endpoint or self.broker.endpoint, keys)

    async def joined(self, **ready: Any) -> tuple[Peer, Worker]:
        """A peer that said READY, and the worker the broker registered for it."""
        peer = self.peer()
        await peer.ready(**ready)
        kind, worker = await self.events.next()
        assert kind == "ready"
        return peer, worker


@contextlib.asynccontextmanager
async def running(heartbeat: Heartbeat) -> AsyncIterator[Harness]:
    events = Recorder()
    keys = BrokerKeys.create()
    broker = Broker("tcp://127.0.0.1:*", events, heartbeat, ModelSpec.from_dict, keys)
    broker.bind()
    broker.start()
    context = zmq.asyncio.Context()
    try:
        yield Harness(broker, keys, events, context)
    finally:
        await broker.close()
        context.destroy(linger=0)


#: Long enough that no heartbeat or liveness check happens during a test that does not set
#: its own.
QUIET = Heartbeat(interval_s=10.0, liveness=3)


@in_loop
async def test_ready_registers_the_worker_with_its_spec_decoded() -> None:
    async with running(QUIET) as harness:
        spec = make_spec(name="double", version="3", max_batch_size=8, max_replicas=2)
        _, worker = await harness.joined(spec=spec, heartbeat_ms=250)
        assert worker.spec == spec
        assert (worker.pid, worker.host, worker.capacity) == (321, "box", 2)
        assert worker.heartbeat == Heartbeat(0.25, QUIET.liveness)
        assert list(harness.broker.workers()) == [worker]


@in_loop
async def test_without_heartbeat_ms_a_worker_keeps_the_brokers_interval() -> None:
    async with running(QUIET) as harness:
        _, worker = await harness.joined()
        assert worker.heartbeat == QUIET


@pytest.mark.parametrize(
    ("ready", "reason"),
    [
        ({"model": {"name": "not a name!"}}, "invalid READY: model name 'not a name!' is not"),
        ({"model": {"name": "m", "max_batch_size": -1}}, "invalid READY: max_batch_size of 'm'"),
        ({"model": None}, "invalid READY: "),
        ({"pid": "many"}, "invalid READY: header of READY: Expected `int`, got `str` - at `$.pid`"),
        ({"heartbeat_ms": "fast"}, "Expected `float | null`, got `str` - at `$.heartbeat_ms`"),
        ({"heartbeat_ms": True}, "Expected `float | null`, got `bool` - at `$.heartbeat_ms`"),
        ({"heartbeat_ms": 0}, "invalid READY: header of READY: Expected `float` >= 10.0"),
        ({"heartbeat_ms": 3_600_000}, "Expected `float` <= 60000.0 - at `$.heartbeat_ms`"),
        ({"capacity": 0}, "Expected `int` >= 1 - at `$.capacity`"),
        ({"capacity": 10**6}, "Expected `int` <= 1024 - at `$.capacity`"),
        ({"host": "h" * 300}, "Expected `str` of length <= 255 - at `$.host`"),
        ({"model": {"name": "m", "x": "y" * 2**20}}, "more than the 1048576 allowed"),
    ],
)
@in_loop
async def test_an_invalid_ready_is_answered_disconnect_with_the_reason(
    ready: dict[str, Any], reason: str
) -> None:
    async with running(QUIET) as harness:
        peer = harness.peer()
        await peer.ready(**ready)
        answer = await peer.receive()
        assert answer.command is Command.DISCONNECT
        assert answer.header["reason"].startswith("invalid READY: ")
        assert answer.header["refused"] is True
        assert reason in answer.header["reason"]
        assert harness.events.seen == [("invalid", answer.header["reason"])]
        assert list(harness.broker.workers()) == []


@in_loop
async def test_a_batch_goes_to_its_worker_and_its_reply_and_error_come_back() -> None:
    async with running(QUIET) as harness:
        peer, worker = await harness.joined()
        assert harness.broker.send_batch(worker, 7, [1, 2]) is True
        assert harness.broker.send_batch(worker, 8, np.arange(6.0).reshape(3, 2)) is True
        first, second = await peer.receive(), await peer.receive()
        assert (first.command, first.header) == (Command.REQUEST, {"id": 7, "inputs": [1, 2]})
        np.testing.assert_array_equal(second.header["inputs"], np.arange(6.0).reshape(3, 2))
        await peer.send(Command.REPLY, {"id": 7, "outputs": [2, 4], "compute_s": 0.003})
        error = {"id": 8, "kind": "bad_input", "type": "ValueError", "message": "ragged"}
        await peer.send(Command.ERROR, error)
        assert await harness.events.next() == ("replied", worker, 7, [2, 4], 0.003)
        assert await harness.events.next() == (
            "failed",
            worker,
            8,
            RemoteError(ErrorKind.BAD_INPUT, "ValueError", "ragged"),
        )


@in_loop
async def test_inputs_that_cannot_be_encoded_raise_value_error_and_send_nothing() -> None:
    async with running(QUIET) as harness:
        peer, worker = await harness.joined()
        with pytest.raises(ValueError, match="inputs cannot be sent to m:1: cannot send"):
            harness.broker.send_batch(worker, 1, [object()])
        assert harness.broker.send_batch(worker, 2, ["next"])
        assert (await peer.receive()).header["id"] == 2  # the first one never left


@in_loop
async def test_the_broker_heartbeats_each_worker_at_the_interval_it_announced() -> None:
    announced_s = 0.02
    # The broker's own interval is ten times longer; liveness leaves the worker ample time.
    async with running(Heartbeat(interval_s=0.2, liveness=20)) as harness:
        peer, _ = await harness.joined(heartbeat_ms=announced_s * 1000)
        first = await peer.receive()
        assert first.command is Command.HEARTBEAT
        intervals = 10
        received = []
        loop = asyncio.get_running_loop()
        end = loop.time() + intervals * announced_s
        while (left := end - loop.time()) > 0:
            try:
                message = await peer.receive(timeout_s=left)
            except TimeoutError:
                break
            received.append(message.command)
            await peer.send(Command.HEARTBEAT)  # answered, as a live worker does
        assert set(received) <= {Command.HEARTBEAT}
        # At the broker's own interval there would be 2 or 3 in this window; at the worker's,
        # one or two per announced interval, and never more.
        assert intervals // 2 <= len(received) <= 2 * intervals + 2
        assert harness.events.seen[1:] == []  # and it was never dropped


@in_loop
async def test_a_worker_with_a_shorter_heartbeat_hears_from_the_broker_within_its_liveness() -> (
    None
):
    async with running(Heartbeat(interval_s=1.0, liveness=3)) as harness:
        announced = Heartbeat(0.05, 3)
        peer, _ = await harness.joined(heartbeat_ms=announced.interval_s * 1000)
        message = await peer.receive(timeout_s=announced.timeout_s)
        assert message.command is Command.HEARTBEAT


@in_loop
async def test_a_worker_silent_past_its_liveness_is_dropped_and_told_why() -> None:
    async with running(Heartbeat(interval_s=0.05, liveness=3)) as harness:
        peer, worker = await harness.joined(heartbeat_ms=20)
        kind, lost, reason = await harness.events.next()
        assert (kind, lost) == ("lost", worker)
        assert reason.startswith("no heartbeat for ")
        assert list(harness.broker.workers()) == []
        received = [await peer.receive()]
        while received[-1].command is Command.HEARTBEAT:  # the broker's, until it gave up
            received.append(await peer.receive())
        assert (received[-1].command, received[-1].header) == (
            Command.DISCONNECT,
            {"reason": reason},
        )


@in_loop
async def test_a_worker_that_keeps_answering_stays_registered_past_its_liveness() -> None:
    announced = Heartbeat(0.02, 5)
    async with running(Heartbeat(interval_s=0.02, liveness=5)) as harness:
        peer, _ = await harness.joined(heartbeat_ms=announced.interval_s * 1000)
        loop = asyncio.get_running_loop()
        end = loop.time() + 3 * announced.timeout_s
        while (left := end - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                message = await peer.receive(timeout_s=left)
                assert message.command is Command.HEARTBEAT
                await peer.send(Command.HEARTBEAT)  # any message is a sign of life
        assert len(harness.events.seen) == 1  # its READY, and no loss
        assert len(list(harness.broker.workers())) == 1


@in_loop
async def test_a_failed_send_answers_false_and_the_loss_is_reported_from_the_loop() -> None:
    async with running(QUIET) as harness:
        peer, worker = await harness.joined()
        peer.socket.close(linger=0)  # the worker's process died: no DISCONNECT
        loop = asyncio.get_running_loop()
        give_up = loop.time() + WAIT_S
        batch_id = 0
        # True while ZeroMQ still has a pipe to the worker; then False, at once.
        while harness.broker.send_batch(worker, batch_id, [batch_id]):
            assert loop.time() < give_up, "the broker never noticed the worker was gone"
            batch_id += 1
            await asyncio.sleep(0)
        assert harness.events.seen[1:] == []  # not reported from inside the send...
        kind, lost, reason = await harness.events.next()  # ...but from the loop, right after
        assert (kind, lost) == ("lost", worker)
        assert reason.startswith("cannot deliver to it (")
        assert list(harness.broker.workers()) == []
        assert harness.broker.send_batch(worker, batch_id + 1, [0]) is False
        await asyncio.sleep(0)
        assert len(harness.events.seen) == 2  # reported once


@in_loop
async def test_a_worker_that_says_disconnect_is_reported_lost() -> None:
    async with running(QUIET) as harness:
        peer, worker = await harness.joined()
        await peer.send(Command.DISCONNECT, {})
        assert await harness.events.next() == ("lost", worker, "the worker disconnected")
        assert list(harness.broker.workers()) == []


@in_loop
async def test_a_worker_that_says_ready_again_replaces_its_old_registration() -> None:
    async with running(QUIET) as harness:
        peer, old = await harness.joined()
        await peer.ready(spec=make_spec(version="2"))
        assert await harness.events.next() == ("lost", old, "the worker registered again")
        kind, new = await harness.events.next()
        assert (kind, new.spec.version) == ("ready", "2")
        assert list(harness.broker.workers()) == [new]


@in_loop
async def test_an_unknown_worker_is_told_to_rejoin_and_a_confused_one_is_dropped() -> None:
    async with running(QUIET) as harness:
        stranger = harness.peer()
        await stranger.send(Command.REPLY, {"id": 1, "outputs": [1]})
        answer = await stranger.receive()
        assert (answer.command, answer.header) == (Command.DISCONNECT, {"reason": "unknown worker"})
        peer, worker = await harness.joined()
        await peer.socket.send_multipart([b"KETCH/0" + Command.HEARTBEAT.value + b"\x80"])
        kind, lost, reason = await harness.events.next()
        assert (kind, lost) == ("lost", worker)
        assert reason.startswith("protocol error: peer speaks protocol b'KETCH/0'")
        assert (await peer.receive()).header == {"reason": reason}
        assert harness.events.seen[0][0] == "ready" and len(harness.events.seen) == 2


@in_loop
async def test_closing_the_broker_tells_every_worker_it_is_shutting_down() -> None:
    async with running(QUIET) as harness:
        peers = [(await harness.joined())[0] for _ in range(2)]
        await harness.broker.close()
        for peer in peers:
            answer = await peer.receive()
            assert (answer.command, answer.header) == (
                Command.DISCONNECT,
                {"reason": "gateway shutting down"},
            )
        assert list(harness.broker.workers()) == []


@in_loop
async def test_local_workers_join_on_a_private_ipc_endpoint_removed_at_close() -> None:
    async with running(QUIET) as harness:
        local = harness.broker.local_endpoint
        assert local.startswith("ipc://") and harness.broker.endpoint.startswith("tcp://")
        directory = Path(local.removeprefix("ipc://")).parent
        # Only this user may enter the directory, so only this user's processes may join.
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        peer = harness.peer(local)
        await peer.ready()
        kind, worker = await harness.events.next()
        assert kind == "ready"
        assert harness.broker.send_batch(worker, 5, [1.0])
        message = await peer.receive()
        assert (message.command, message.header["id"]) == (Command.REQUEST, 5)
    assert not directory.exists()


@in_loop
async def test_a_peer_without_curve_is_refused_reported_once_and_never_registered() -> None:
    async with running(QUIET) as harness:
        for _ in range(2):
            rogue = harness.peer(keys=None)
            await rogue.ready()
            kind, _, reason, _ = await harness.events.next()
            # ZeroMQ mostly says the mechanisms differ; sometimes only that the handshake
            # failed, without detail.
            assert kind == "refused"
            assert "does not speak CURVE" in reason or "handshake failed" in reason
            rogue.socket.close(linger=0)
        # Every refusal is counted; only the first of each reason is new (the one logged).
        refusals = [event for event in harness.events.seen if event[0] == "refused"]
        for reason in {event[2] for event in refusals}:
            firsts = [event[3] for event in refusals if event[2] == reason]
            assert firsts == [True] + [False] * (len(firsts) - 1)
        assert list(harness.broker.workers()) == []


@in_loop
async def test_a_curve_peer_with_a_key_not_authorized_is_refused() -> None:
    async with running(QUIET) as harness:
        stranger = WorkerKeys(harness.keys.server.public, KeyPair.generate())
        rogue = harness.peer(keys=stranger)
        await rogue.ready()
        kind, peer, reason, _ = await harness.events.next()
        assert kind == "refused" and "not among the authorized worker keys" in reason
        assert peer == f"127.0.0.1 with key {stranger.own.public.decode()}"
        # A peer that does not know the broker's public key fails its handshake too.
        impostor = harness.peer(keys=WorkerKeys(KeyPair.generate().public, KeyPair.generate()))
        await impostor.ready()
        kind, _, reason, _ = await harness.events.next()
        assert kind == "refused" and "handshake" in reason
        # And the trusted key still joins.
        _, worker = await harness.joined()
        assert list(harness.broker.workers()) == [worker]


@in_loop
async def test_a_ready_the_core_refuses_is_told_why_and_never_registered() -> None:
    async with running(QUIET) as harness:
        harness.events.refusal = "this gateway does not serve model 'm:1'"
        peer = harness.peer()
        await peer.ready()
        answer = await peer.receive()
        assert answer.command is Command.DISCONNECT
        assert answer.header == {
            "reason": "this gateway does not serve model 'm:1'",
            "refused": True,
        }
        assert list(harness.broker.workers()) == []
        assert harness.events.seen == []
