"""A worker's connections to its brokers: its first one, and the other gateways' it is told of.

Each :class:`Link` is one DEALER: READY when it joins, heartbeats both ways, its handshake
watched until it ends (a broker that refuses this worker's keys closes the connection for
good, which would otherwise look like a silent broker), and a back-off while it rejoins.
:class:`Links` polls them all from the main thread. The **first** link is the worker's own
gateway: losing it ends a worker that gateway started (it will replace it) or, for a worker
started by hand, makes it rejoin. A **peer** link goes to another gateway that its first
broker named in PEERS: it rejoins whatever happens, until PEERS no longer names it.

While the model computes, the main thread lends the sockets to the heartbeat thread under
one lock, so a long batch never silences the worker on any of its links.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from ketch.zmq_transport.liveness import Heartbeat, peer_expired
from ketch.zmq_transport.protocol import (
    Command,
    Disconnect,
    Frame,
    PeerBroker,
    Peers,
    ProtocolError,
    Ready,
    command_of,
    decode,
    encode,
    read,
    worth_zero_copy,
)
from ketch.zmq_transport.security import WorkerKeys

log = logging.getLogger("ketch.worker")

#: Longest wait between two attempts to rejoin a broker that went away.
MAX_REJOIN_BACKOFF_S = 30.0

HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class Outcome(enum.Enum):
    """What a link's broker said or did, for :class:`Links` to act on."""

    #: Nothing that changes the link (a heartbeat, a message acted on already).
    STAY = "stay"
    #: Disconnected, or silent past its liveness: the broker let this worker go.
    LEFT = "left"
    #: Its READY or its keys were refused: joining again at once would be refused again.
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class LinkOptions:
    """What every link of one worker shares."""

    heartbeat: Heartbeat
    keys: WorkerKeys | None


class Link:
    """One DEALER to one broker; driven by :class:`Links`, never blocking on its own.

    :param keys: this worker's CURVE keys for this broker (its pair, the broker's public
        key); None for an insecure broker.
    """

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        ready: Ready,
        options: LinkOptions,
        keys: WorkerKeys | None,
    ) -> None:
        self.endpoint = endpoint
        self._context = context
        self._ready = ready
        self._options = options
        self._keys = keys
        self._backoff = 1.0
        self._refusals = 0
        self.dealer: zmq.Socket[bytes] | None = None
        self.handshake: zmq.Socket[bytes] | None = None
        #: While backing off: when to join again (no socket meanwhile).
        self.rejoin_at: float | None = None
        self._last_heard = self._last_sent = time.monotonic()
        self._join()

    # -- what Links polls -------------------------------------------------------------------

    def sockets(self) -> list[zmq.Socket[bytes]]:
        return [s for s in (self.dealer, self.handshake) if s is not None]

    def due_s(self, now: float) -> float:
        """Seconds until this link needs :meth:`tick` (a heartbeat, a silence, a rejoin)."""
        if self.rejoin_at is not None:
            return max(0.0, self.rejoin_at - now)
        return max(0.0, self._last_sent + self._options.heartbeat.interval_s - now)

    def tick(self, now: float) -> Outcome:
        """Join again once a back-off is over; send a heartbeat when one is due; LEFT when the
        broker has been silent past its liveness (stretched while rejoining)."""
        if self.rejoin_at is not None:
            if now >= self.rejoin_at:
                self.rejoin_at = None
                self._join()
            return Outcome.STAY
        heartbeat = self._options.heartbeat
        silence = Heartbeat(heartbeat.interval_s * self._backoff, heartbeat.liveness)
        if peer_expired(self._last_heard, now, silence):
            log.warning("broker at %s is silent", self.endpoint)
            return Outcome.LEFT
        if now - self._last_sent >= heartbeat.interval_s:
            self.send_heartbeat()
        return Outcome.STAY

    def handshake_refused(self) -> bool:
        """Read the handshake's outcome (its monitor is readable): True when refused."""
        assert self.handshake is not None
        while self.handshake is not None and self.handshake.poll(0, zmq.POLLIN):
            event = recv_monitor_message(self.handshake)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._stop_watching_handshake()
                return False
            log.warning(
                "the broker at %s refused this worker: %s",
                self.endpoint,
                _refusal_reason(event, self._keys),
            )
            return True
        return False

    def receive(self) -> list[bytes]:
        """The next message from the broker (the dealer is readable)."""
        assert self.dealer is not None
        self._last_heard = time.monotonic()
        return self.dealer.recv_multipart()

    def heard_as_admitted(self) -> None:
        # Admitted and heard from: the next loss or refusal starts its back-off afresh.
        self._backoff = 1.0
        self._refusals = 0

    def busy_until_now(self) -> None:
        """Busy is not silent: what the broker sent while the model computed is read next."""
        self._last_heard = max(self._last_heard, time.monotonic())

    # -- sending ----------------------------------------------------------------------------

    def send(self, frames: list[Frame]) -> None:
        if self.dealer is None:
            log.warning("dropped a reply: the broker at %s is away", self.endpoint)
            return
        try:
            self.dealer.send_multipart(frames, zmq.NOBLOCK, copy=not worth_zero_copy(frames))
        except zmq.Again:
            # No way to the broker right now; it retries the batch elsewhere when this worker
            # goes silent, so a reply is never worth blocking the worker for.
            log.warning("dropped a reply: the broker at %s is unreachable", self.endpoint)
            return
        self._last_sent = time.monotonic()

    def send_heartbeat(self) -> None:
        if self.dealer is not None:
            # A heartbeat that cannot be queued is not worth waiting for: silence says the same.
            with contextlib.suppress(zmq.Again):
                self.dealer.send_multipart(encode(Command.HEARTBEAT), zmq.NOBLOCK)
        self._last_sent = time.monotonic()

    # -- joining ----------------------------------------------------------------------------

    def rejoin(self, refused: bool = False) -> None:
        """Close this connection and join again with a new identity: at once after a loss
        (its silence limit doubling up to the cap), after 1, 2, 4 ... s after a refusal."""
        self._close_dealer()
        timeout_s = self._options.heartbeat.timeout_s
        if refused:
            self._refusals += 1
            delay_s = min(2.0 ** (self._refusals - 1), MAX_REJOIN_BACKOFF_S)
            log.info("trying to join %s again in %g s", self.endpoint, delay_s)
            self.rejoin_at = time.monotonic() + delay_s
        else:
            self._join()
        self._backoff = min(self._backoff * 2, MAX_REJOIN_BACKOFF_S / timeout_s)

    def _join(self) -> None:
        dealer = self._context.socket(zmq.DEALER)
        if self._keys is not None:
            self._keys.apply(dealer)
        self.handshake = dealer.get_monitor_socket(HANDSHAKE_EVENTS)
        dealer.connect(self.endpoint)
        # Queued at once: a connecting socket holds messages until the handshake is done.
        dealer.send_multipart(encode(Command.READY, self._ready), zmq.NOBLOCK)
        self.dealer = dealer
        self._last_heard = self._last_sent = time.monotonic()

    def close(self, say_goodbye: bool) -> None:
        if say_goodbye and self.dealer is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.dealer.send_multipart(encode(Command.DISCONNECT, {}), zmq.NOBLOCK)
        self._close_dealer()

    def _close_dealer(self) -> None:
        self._stop_watching_handshake()
        if self.dealer is not None:
            self.dealer.close(linger=0)
            self.dealer = None

    def _stop_watching_handshake(self) -> None:
        if self.handshake is not None:
            if self.dealer is not None:
                self.dealer.disable_monitor()
            self.handshake.close(linger=0)
            self.handshake = None


class Links:
    """Every broker a worker serves: its first one, and the peers that one names.

    :param rejoin: whether losing the first broker means joining it again (a worker started
        by hand) rather than ending (one its gateway started, and will replace).
    """

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        broker: str,
        ready: Ready,
        options: LinkOptions,
        rejoin: bool,
    ) -> None:
        self._context = context
        self._ready = ready
        self._options = options
        self._rejoin_first = rejoin
        self.first = Link(context, broker, ready, options, options.keys)
        self._peers: dict[PeerBroker, Link] = {}
        self._lock = threading.Lock()
        self._lock.acquire()  # the main thread holds the sockets unless it lends them
        self._closed = threading.Event()
        self._heartbeats = threading.Thread(
            target=self._beat_while_lent, name="ketch-heartbeat", daemon=True
        )
        self._heartbeats.start()

    def all(self) -> list[Link]:
        return [self.first, *self._peers.values()]

    def next_request(self) -> tuple[Link, list[bytes]] | None:
        """The next REQUEST and the link it came on, heartbeating meanwhile; None when the
        worker must stop (its first broker let it go, and it is not to rejoin)."""
        while True:
            links = self.all()
            poller = zmq.Poller()
            owner: dict[zmq.Socket[bytes], Link] = {}
            for link in links:
                for sock in link.sockets():
                    poller.register(sock, zmq.POLLIN)
                    owner[sock] = link
            now = time.monotonic()
            wait_ms = int(min(link.due_s(now) for link in links) * 1000) + 1
            for sock, _ in poller.poll(wait_ms):
                link = owner[sock]
                if sock is link.handshake:
                    outcome = Outcome.REFUSED if link.handshake_refused() else Outcome.STAY
                elif sock is link.dealer:
                    frames = link.receive()
                    if command_of(frames) is Command.REQUEST:
                        link.heard_as_admitted()
                        return link, frames
                    outcome = self._handle(link, frames)
                else:
                    continue  # a socket closed by an earlier outcome of this poll
                if not self._settle(link, outcome):
                    return None
            now = time.monotonic()
            for link in self.all():
                if not self._settle(link, link.tick(now)):
                    return None

    def _settle(self, link: Link, outcome: Outcome) -> bool:
        """Act on what a link's broker did; False when the worker must stop."""
        if outcome is Outcome.STAY:
            return True
        if link is self.first and not self._rejoin_first:
            return False
        link.rejoin(refused=outcome is Outcome.REFUSED)
        return True

    def _handle(self, link: Link, frames: list[bytes]) -> Outcome:
        """One message from a broker that is not a REQUEST."""
        command = command_of(frames)
        if command is None:
            log.warning("ignoring a malformed message from the broker at %s", link.endpoint)
            return Outcome.STAY
        if command is Command.PEERS:
            if link is self.first:
                self._set_peers(frames)
            link.heard_as_admitted()
            return Outcome.STAY
        if command is not Command.DISCONNECT:
            link.heard_as_admitted()
            return Outcome.STAY
        try:
            disconnect = read(decode(frames), Disconnect)
        except ProtocolError:
            disconnect = Disconnect()
        if disconnect.refused:
            log.warning(
                "the gateway at %s refused this worker: %s", link.endpoint, disconnect.reason
            )
            return Outcome.REFUSED
        log.info("the broker at %s disconnected this worker: %s", link.endpoint, disconnect.reason)
        return Outcome.LEFT

    def _set_peers(self, frames: list[bytes]) -> None:
        try:
            peers = read(decode(frames), Peers)
        except ProtocolError as exc:
            log.warning("ignoring a malformed PEERS: %s", exc)
            return
        wanted = {peer for peer in peers.brokers if peer.endpoint != self.first.endpoint}
        for peer in set(self._peers) - wanted:
            log.info("leaving the broker at %s: no longer a peer", peer.endpoint)
            self._peers.pop(peer).close(say_goodbye=True)
        for peer in wanted - set(self._peers):
            can_meet, keys = self._keys_for(peer)
            if not can_meet:
                continue
            log.info("joining the peer broker at %s", peer.endpoint)
            link = Link(self._context, peer.endpoint, self._ready, self._options, keys)
            self._peers[peer] = link

    def _keys_for(self, peer: PeerBroker) -> tuple[bool, WorkerKeys | None]:
        """Whether this worker can join ``peer``'s broker (not when one speaks CURVE and the
        other does not), and its keys there: its own pair with that broker's public key."""
        own = self._options.keys
        if (own is None) != (peer.server_key is None):
            log.warning(
                "not joining the peer broker at %s: %s",
                peer.endpoint,
                "it speaks CURVE and this worker has no keys"
                if own is None
                else "it is insecure and this worker speaks CURVE",
            )
            return False, None
        if own is None or peer.server_key is None:
            return True, None
        return True, WorkerKeys(peer.server_key.encode(), own.own)

    @contextlib.contextmanager
    def lent_for_heartbeats(self) -> Iterator[None]:
        """Let the heartbeat thread use the sockets while the main thread computes."""
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            for link in self.all():
                link.busy_until_now()

    def close(self) -> None:
        self._closed.set()
        self._lock.release()
        self._heartbeats.join()
        for link in self.all():
            link.close(say_goodbye=True)

    def _beat_while_lent(self) -> None:
        interval = self._options.heartbeat.interval_s
        while not self._closed.wait(interval):
            # Only gets the lock while the main thread computes (or has closed the links).
            with self._lock:
                if self._closed.is_set():
                    return
                now = time.monotonic()
                for link in self.all():
                    if link.rejoin_at is None and link.due_s(now) == 0.0:
                        link.send_heartbeat()


def _refusal_reason(event: int, keys: WorkerKeys | None) -> str:
    if keys is None:
        return "it speaks CURVE and this worker has no keys (give it --broker-keys DIR)"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            "this worker's public key is not among its authorized keys (the operator adds "
            "worker.key to the broker's authorized/ folder)"
        )
    return "the CURVE handshake failed: the server key this worker has is not the broker's"
