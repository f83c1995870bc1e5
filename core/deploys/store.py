"""The model store (``ketch serve --store DIR``): what was deployed, kept so that a restarted
server serves it again, the same versions.

Layout::

    STORE/code/<digest>/          the code of a deploy, by the digest of its files (immutable;
                                  the same code deployed twice is stored once)
    STORE/envs/<key>/             environments (:mod:`ketch.pools.envs`)
    STORE/deployments/<name>/<version>.json
                                  one record per deployed version, written (and fsynced) only
                                  once its models were ready: a failed deploy leaves none
    STORE/defaults/<model>        the version requests without one go to, once a deployed
                                  model was rolled
    STORE/uploads/                archives being received and unpacked (emptied at start)

Nothing under the store is ever served over HTTP.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path

import msgspec

from ketch.specs.models import ModelSpec


class DeploymentRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One deployed version as the store keeps it.

    :param name: the deployment's name (``ketch deploy --name``).
    :param version: its number: 1, 2, ... per name; every model it declares is served under
        this version.
    :param digest: the digest of its code (``STORE/code/<digest>``).
    :param entry: what declares its models: a file of the code, or a module (a wheel's).
    :param env: the key of its environment (``STORE/envs/<key>``); None: the server's own.
    :param env_describe: what the environment installs, for people.
    :param models: the specs it serves, as they were served.
    :param created_at: when it became ready (seconds since the epoch).
    """

    name: str
    version: int
    digest: str
    entry: str
    env: str | None = None
    env_describe: str | None = None
    models: tuple[ModelSpec, ...] = ()
    created_at: float = 0.0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(DeploymentRecord)


class Store:
    """The folders of one model store, and its records."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.code = root / "code"
        self.envs = root / "envs"
        self.uploads = root / "uploads"
        self._records = root / "deployments"
        self._defaults = root / "defaults"

    def open(self) -> None:
        """Create the folders (private to this user) and drop what an earlier run left
        half-received."""
        for folder in (self.root, self.code, self.envs, self.uploads, self._records):
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
        for leftover in self.uploads.iterdir():
            _remove(leftover)

    def new_upload(self) -> Path:
        """A fresh path under ``uploads/`` for one archive and its unpacked files."""
        return self.uploads / uuid.uuid4().hex

    def code_folder(self, digest: str) -> Path:
        return self.code / digest

    def adopt(self, tree: Path, digest: str) -> Path:
        """Move an unpacked ``tree`` into ``code/<digest>`` (or drop it, when that code is
        stored already) and return the stored folder."""
        stored = self.code_folder(digest)
        if stored.is_dir():
            shutil.rmtree(tree, ignore_errors=True)
        else:
            try:
                os.rename(tree, stored)
            except OSError:
                if not stored.is_dir():  # not another deploy of the same code meanwhile
                    raise
                shutil.rmtree(tree, ignore_errors=True)
        return stored

    # -- records ----------------------------------------------------------------------------

    def records(self) -> list[DeploymentRecord]:
        """Every deployed version, by name then version."""
        found = []
        for path in sorted(self._records.glob("*/*.json")):
            with contextlib.suppress(OSError, msgspec.DecodeError):
                found.append(_decoder.decode(path.read_bytes()))
        return sorted(found, key=lambda r: (r.name, r.version))

    def save(self, record: DeploymentRecord) -> DeploymentRecord:
        """Write ``record`` durably (a temporary file, fsynced, renamed into place)."""
        stamped = msgspec.structs.replace(record, created_at=record.created_at or time.time())
        _write_durably(self._record_path(record.name, record.version), _encoder.encode(stamped))
        return stamped

    def delete(self, name: str, version: int) -> None:
        """Forget one version, and its code once no record uses it."""
        path = self._record_path(name, version)
        record = _decoder.decode(path.read_bytes()) if path.is_file() else None
        path.unlink(missing_ok=True)
        if not any(path.parent.glob("*.json")):
            _remove(path.parent)
        if record is not None and not any(r.digest == record.digest for r in self.records()):
            _remove(self.code_folder(record.digest))

    def default_of(self, model: str) -> str | None:
        """The version ``model`` was last rolled to, if any."""
        with contextlib.suppress(OSError):
            return (self._defaults / model).read_text().strip() or None
        return None

    def remember_default(self, model: str, version: str) -> None:
        if "/" in model or model.startswith("."):
            return  # not a file name (model names are URL segments, checked elsewhere)
        _write_durably(self._defaults / model, version.encode())

    def _record_path(self, name: str, version: int) -> Path:
        return self._records / name / f"{version}.json"


def _write_durably(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
