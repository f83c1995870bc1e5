"""CURVE on the worker link: the keys each side holds and who may join the broker.

Every broker speaks CURVE (ZeroMQ's elliptic-curve encryption and authentication) unless its
operator turns it off. A worker must know the broker's public key, and the broker admits only
workers whose public key it trusts: the ones in an ``authorized`` folder of public
certificates (re-read when the folder changes, so a key can be added without a restart) and
the key the gateway makes at start for the workers it launches itself.

Keys are ZeroMQ certificate files, written and read by :mod:`zmq.auth`: ``NAME.key`` holds a
public key, ``NAME.key_secret`` the pair. :func:`keygen` writes a folder a gateway and its
remote workers share::

    DIR/server.key, DIR/server.key_secret     the broker's pair (the gateway keeps the secret)
    DIR/worker.key, DIR/worker.key_secret     a worker pair (remote workers keep the secret)
    DIR/authorized/worker.key                 the worker keys the broker admits
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

log = logging.getLogger(__name__)

SERVER = "server"
WORKER = "worker"
AUTHORIZED = "authorized"


class KeyFileError(ValueError):
    """A key file that is missing or does not hold what it must."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair, both halves Z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes

    def __repr__(self) -> str:  # never print a secret key
        return f"KeyPair(public={self.public.decode()!r})"

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def load(cls, path: Path) -> KeyPair:
        """The pair in a ``*.key_secret`` certificate."""
        public, secret = _read_certificate(path)
        if secret is None:
            raise KeyFileError(f"{path} holds no secret key (use the .key_secret file)")
        return cls(public, secret)


def load_public_key(path: Path) -> bytes:
    """The public key of a ``*.key`` (or ``*.key_secret``) certificate."""
    return _read_certificate(path)[0]


def _read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a ZeroMQ certificate: {exc}") from None
    return public, secret


@dataclass(frozen=True, slots=True)
class WorkerKeys:
    """What a worker needs to join a CURVE broker: the broker's public key and its own pair."""

    server: bytes
    own: KeyPair

    def __repr__(self) -> str:
        return f"WorkerKeys(server={self.server.decode()!r}, own={self.own!r})"

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        """Make ``sock`` (before it connects) a CURVE client of the broker."""
        sock.curve_serverkey = self.server
        sock.curve_publickey = self.own.public
        sock.curve_secretkey = self.own.secret

    def to_dict(self) -> dict[str, str]:
        """As plain strings, for a worker's plan (which never travels on a command line)."""
        return {
            "server": self.server.decode(),
            "public": self.own.public.decode(),
            "secret": self.own.secret.decode(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> WorkerKeys:
        return cls(
            data["server"].encode(), KeyPair(data["public"].encode(), data["secret"].encode())
        )

    @classmethod
    def from_files(cls, server_key: Path, own_key: Path) -> WorkerKeys:
        """From the broker's ``server.key`` and this worker's ``*.key_secret``."""
        return cls(load_public_key(server_key), KeyPair.load(own_key))

    @classmethod
    def from_folder(cls, folder: Path) -> WorkerKeys:
        """From a folder :func:`keygen` wrote: ``server.key`` and ``worker.key_secret``."""
        return cls.from_files(folder / f"{SERVER}.key", folder / f"{WORKER}.key_secret")


class AuthorizedKeys:
    """The worker public keys a broker admits: those in ``folder`` (every ``*.key`` there,
    read again whenever the folder changes) and the ``trusted`` ones given in memory.

    Called by ZeroMQ's authentication handler (:mod:`zmq.auth`) from its own thread, once per
    connection, never per message.
    """

    def __init__(self, folder: Path | None, trusted: Iterable[bytes] = ()) -> None:
        self.folder = folder
        self._trusted = frozenset(trusted)
        #: The keys of the workers that the other gateways of a cluster start.
        self._peers: frozenset[bytes] = frozenset()
        self._lock = threading.Lock()
        self._loaded_at: int | None = None
        self._from_folder: frozenset[bytes] = frozenset()

    def allows(self, key: bytes) -> bool:
        return key in self._trusted or key in self._peers or key in self._folder_keys()

    def trust_peers(self, keys: Iterable[bytes]) -> None:
        """Admit these too from now on, and no earlier ones: the keys of the workers that the
        other gateways of a cluster start (they join every gateway). One assignment, so the
        authentication thread sees the old set or the new one."""
        self._peers = frozenset(keys)

    def _folder_keys(self) -> frozenset[bytes]:
        if self.folder is None:
            return frozenset()
        with self._lock:
            try:
                stamp = self.folder.stat().st_mtime_ns
            except OSError:
                return frozenset()  # a folder that went away admits no one
            if stamp != self._loaded_at:
                self._loaded_at = stamp
                self._from_folder = frozenset(_public_keys_in(self.folder))
            return self._from_folder


def _public_keys_in(folder: Path) -> Iterator[bytes]:
    for path in sorted(folder.glob("*.key")):
        try:
            yield load_public_key(path)
        except KeyFileError as exc:
            log.warning("ignoring %s in the authorized keys: %s", path.name, exc)


@dataclass(frozen=True, slots=True)
class BrokerKeys:
    """A broker's CURVE settings: its own pair, the workers it admits, and the pair the
    workers this machine starts get (trusted without being in any folder)."""

    server: KeyPair
    authorized: AuthorizedKeys
    local_workers: KeyPair

    def __repr__(self) -> str:
        return f"BrokerKeys(server={self.server!r}, authorized={self.authorized.folder})"

    @classmethod
    def create(cls, folder: Path | None = None) -> BrokerKeys:
        """The broker's pair from ``folder/server.key_secret`` and the workers admitted from
        ``folder/authorized/``; without a folder, a pair made now (only the gateway's own
        workers can then join)."""
        local = KeyPair.generate()
        if folder is None:
            return cls(KeyPair.generate(), AuthorizedKeys(None, [local.public]), local)
        server = KeyPair.load(folder / f"{SERVER}.key_secret")
        authorized = folder / AUTHORIZED
        if not authorized.is_dir():
            raise KeyFileError(f"{folder} has no {AUTHORIZED}/ folder of worker keys")
        return cls(server, AuthorizedKeys(authorized, [local.public]), local)

    def local_worker_keys(self) -> WorkerKeys:
        return WorkerKeys(self.server.public, self.local_workers)

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        """Make ``sock`` (before it binds) a CURVE server with this broker's pair."""
        sock.curve_server = True
        sock.curve_publickey = self.server.public
        sock.curve_secretkey = self.server.secret


def keygen(folder: Path) -> list[Path]:
    """Write a server pair, a worker pair and ``authorized/worker.key`` into ``folder``
    (created if missing); refuses to overwrite keys already there. Secret files are readable
    by their owner only, and so are the folders it creates. Returns the files written."""
    names = [f"{name}{suffix}" for name in (SERVER, WORKER) for suffix in (".key", ".key_secret")]
    present = [name for name in names if (folder / name).exists()]
    if present:
        raise KeyFileError(f"{folder} already has {', '.join(present)}; not overwriting keys")
    authorized = folder / AUTHORIZED
    with _private_files():
        folder.mkdir(parents=True, exist_ok=True)
        for name in (SERVER, WORKER):
            zmq.auth.create_certificates(folder, name)
        authorized.mkdir(exist_ok=True)
        shutil.copyfile(folder / f"{WORKER}.key", authorized / f"{WORKER}.key")
    return [*(folder / name for name in names), authorized / f"{WORKER}.key"]


@contextlib.contextmanager
def _private_files() -> Iterator[None]:
    # zmq.auth writes with the process umask; a secret key must never be readable by others,
    # not even for the moment between writing it and a chmod.
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)
