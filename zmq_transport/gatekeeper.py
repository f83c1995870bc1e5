"""Who gets through the broker's door: CURVE on its socket, and word of every peer refused.

:class:`Gatekeeper` makes the broker's ROUTER socket a CURVE server and runs ZeroMQ's
authentication handler (a :class:`zmq.auth.thread.ThreadAuthenticator`) that asks
:class:`~ketch.zmq_transport.security.AuthorizedKeys` about each connecting worker's key. Each
refusal is reported with the peer and the reason, and whether that peer was refused before (so
it is logged once per peer but counted every time):

- a CURVE peer whose key is not authorized reaches the handler, which knows its address and
  key: the peer is that pair;
- a peer that fails the handshake before (no CURVE at all, or not the broker's public key) is
  seen only in the socket's monitor, which names no address: such refusals are told once per
  reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

import zmq
import zmq.utils.monitor
from zmq.auth.thread import ThreadAuthenticator

from ketch.zmq_transport.security import AuthorizedKeys, BrokerKeys

log = logging.getLogger("ketch.broker")

#: ``(peer, reason, first)``: ``first`` is True the first time this peer is refused.
OnRefused = Callable[[str, str, bool], None]

#: Handshakes that fail before the authentication handler is asked.
_WATCHED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
NOT_AUTHORIZED = "its key is not among the authorized worker keys"
#: Who a peer refused before the authentication handler is: ZeroMQ names no address then.
UNNAMED_PEER = "a peer ZeroMQ does not name"


class Gatekeeper:
    """CURVE and refusal reports for one broker socket; :meth:`open` before it binds."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], keys: BrokerKeys) -> None:
        self._context = context
        self._keys = keys
        self._authenticator: _Authenticator | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_refused: OnRefused = lambda peer, reason, first: None
        self._refused: set[tuple[str, str]] = set()

    def open(self, sock: zmq.Socket[bytes], on_refused: OnRefused) -> None:
        """Make ``sock`` a CURVE server that admits only authorized keys, and report each
        peer it refuses to ``on_refused`` (from the running event loop)."""
        self._on_refused = on_refused
        self._loop = loop = asyncio.get_running_loop()

        def key_refused(address: str, key: bytes) -> None:
            # Called in the handler's thread; reported from the loop's.
            peer = f"{address or 'this machine (ipc)'} with key {key.decode()}"
            loop.call_soon_threadsafe(self._report, peer, NOT_AUTHORIZED)

        authenticator = _Authenticator(self._context, self._keys.authorized, key_refused)
        authenticator.start()
        self._authenticator = authenticator
        self._keys.apply(sock)
        self._monitor = sock.get_monitor_socket(_WATCHED)
        loop.add_reader(_fd_of(self._monitor), self._read_events)
        loop.call_soon(self._read_events)  # the descriptor is edge-triggered

    def close(self) -> None:
        if self._monitor is not None and self._loop is not None:
            self._loop.remove_reader(_fd_of(self._monitor))
            self._monitor.close(linger=0)
            self._monitor = None
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    def _report(self, peer: str, reason: str) -> None:
        first = (peer, reason) not in self._refused
        self._refused.add((peer, reason))
        self._on_refused(peer, reason, first)

    def _read_events(self) -> None:
        while self._monitor is not None:
            try:
                event = zmq.utils.monitor.recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            reason = _reason(event["event"], event["value"])
            self._report(UNNAMED_PEER, reason)


class _Authenticator(ThreadAuthenticator):
    """ZeroMQ's handler, told each request's address so a refused key is reported with it."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        authorized: AuthorizedKeys,
        refused: Callable[[str, bytes], None],
    ) -> None:
        super().__init__(context, log=log.getChild("auth"))
        self._authorized = authorized
        self._refused = refused
        self._address = ""
        self.configure_curve_callback("*", self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # ZAP (ZeroMQ RFC 27) requests are [version, id, domain, address, identity, mechanism,
        # credentials...]; the handler thread takes them one at a time.
        self._address = msg[3].decode(errors="replace") if len(msg) > 3 else ""
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = self._authorized.allows(key)
        if not allowed:
            self._refused(self._address, key)
        return allowed


def _fd_of(sock: zmq.Socket[bytes]) -> int:
    return cast(int, sock.getsockopt(zmq.FD))


def _reason(kind: int, value: int) -> str:
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "it does not speak CURVE (no keys, or --insecure-broker on its side)"
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return "its CURVE handshake failed: it does not have this broker's public key"
        return f"it broke the ZeroMQ handshake (protocol error {value:#x})"
    return "its ZeroMQ handshake failed (garbage, or it left during the handshake)"
