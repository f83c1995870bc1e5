"""Keep each application's policy state, so a restarted gateway goes on learning.

Where it is kept is a :class:`StateStore`: on disk (:class:`FileStateStore`, the default), or
in Redis with ``--state redis://`` (:mod:`ketch.applications.shared`).

On disk it is one JSON file per application under the state directory
(``apps/{name}.json``), written atomically and durably: a temporary file, flushed to the disk
(``fsync``), renamed over the old one, and the directory flushed too, so that the rename itself
survives a power cut. A crash mid-write leaves the previous state (and perhaps a
``.{name}.*.tmp`` file, never read); once :meth:`FileStateStore.write` has returned, the new
state is on the disk.

What is saved records the policy and models it was learnt with: state saved for another
policy is not loaded into this one (it is kept aside as ``.stale``). State saved for other
models (an operator linked or unlinked some through the management API) is offered to the
same policy, whose ``load_state_dict`` keeps what it knows of the models it still has.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from ketch.errors import KetchError
from ketch.specs.apps import AppSpec

log = logging.getLogger("ketch.apps")

#: Where policy state goes unless ``--state-dir`` or ``KETCH_STATE_DIR`` says otherwise.
STATE_DIR_ENV = "KETCH_STATE_DIR"


def default_state_dir() -> Path:
    """``$KETCH_STATE_DIR``, else ``$XDG_STATE_HOME/ketch``, else ``~/.local/state/ketch``."""
    if explicit := os.environ.get(STATE_DIR_ENV):
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "ketch"


class SharedStateError(KetchError):
    """The Redis that gateways share state in could not be reached or refused a command: the
    message says which and why."""


class StateNotSaved(Exception):
    """The policy state of an application could not be written: the message names the
    application, the file, the step that failed and the operating system's reason."""


#: What ``fsync`` of a directory raises on a file system that cannot flush one (some network
#: and FUSE file systems): the file itself was flushed, and there is nothing more to do.
_DIRECTORY_SYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


@dataclass(frozen=True, slots=True)
class SavedState:
    """A policy's state as saved, the models it was learnt with, and (shared through Redis)
    the position in the feedback stream it includes."""

    state: dict[str, Any]
    models: tuple[str, ...]
    applied: str | None = None


def encode_saved(spec: AppSpec, state: dict[str, Any], applied: str | None) -> bytes:
    """What is stored for ``state``; raises ``TypeError`` when it is not JSON."""
    saved: dict[str, Any] = {"app": spec.name, "policy": spec.policy, "models": list(spec.models)}
    if applied is not None:
        saved["applied"] = applied
    saved["state"] = state
    return orjson.dumps(saved, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_INDENT_2)


def decode_saved(content: bytes, spec: AppSpec) -> tuple[SavedState | None, str]:
    """The state in ``content`` if it was saved by ``spec``'s policy; else None and why not."""
    try:
        saved = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        return None, f"it cannot be read ({exc})"
    if not isinstance(saved, dict):
        return None, "it is not a JSON object"
    if (
        saved.get("policy") != spec.policy
        or not isinstance(saved.get("models"), list)
        or not isinstance(saved.get("state"), dict)
    ):
        return None, f"it was saved for policy {saved.get('policy')!r}, not {spec.policy!r}"
    applied = saved.get("applied")
    return SavedState(
        saved["state"], tuple(saved["models"]), applied if isinstance(applied, str) else None
    ), ""


class StateStore(Protocol):
    """Where applications' policy state is kept."""

    def where(self, app_name: str) -> str:
        """Where the application's state is, for messages."""

    def load(self, spec: AppSpec) -> SavedState | None:
        """The state saved for this application with the same policy, or None."""

    def set_aside(self, app_name: str, why: str) -> None:
        """Keep the application's saved state out of the way, saying ``why``."""

    def encode(self, spec: AppSpec, state: dict[str, Any], applied: str | None) -> bytes:
        """What is written for ``state``; raises ``TypeError`` when it is not JSON."""

    def write(self, app_name: str, content: bytes, applied: str | None) -> None:
        """Replace the application's state with ``content``; raises :class:`StateNotSaved`."""


class FileStateStore:
    """Reads and writes the policy state of applications under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path_of(self, app_name: str) -> Path:
        return self.directory / "apps" / f"{app_name}.json"

    def where(self, app_name: str) -> str:
        return str(self.path_of(app_name))

    def load(self, spec: AppSpec) -> SavedState | None:
        """The state saved for this application with the same policy, or None."""
        path = self.path_of(spec.name)
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._set_aside(path, f"it cannot be read ({exc})")
            return None
        saved, why = decode_saved(content, spec)
        if saved is None:
            self._set_aside(path, why)
        return saved

    def set_aside(self, app_name: str, why: str) -> None:
        """Keep the application's saved state out of the way (``.stale``), saying ``why``."""
        self._set_aside(self.path_of(app_name), why)

    def save(self, spec: AppSpec, state: dict[str, Any]) -> None:
        """Write ``state`` for the application; raises ``TypeError`` when it is not JSON,
        :class:`StateNotSaved` when it cannot be written."""
        self.write(spec.name, self.encode(spec, state, None), None)

    def encode(self, spec: AppSpec, state: dict[str, Any], applied: str | None) -> bytes:
        return encode_saved(spec, state, applied)

    def write(self, app_name: str, content: bytes, applied: str | None) -> None:
        """Replace the application's file with ``content``, on the disk when this returns;
        raises :class:`StateNotSaved`, leaving the previous file as it was."""
        path = self.path_of(app_name)
        step = f"creating {path.parent}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            step = f"creating a temporary file in {path.parent}"
            handle, temporary = tempfile.mkstemp(
                prefix=f".{app_name}.", suffix=".tmp", dir=path.parent
            )
            try:
                with os.fdopen(handle, "wb") as out:
                    step = f"writing {temporary}"
                    out.write(content)
                    out.flush()
                    step = f"flushing {temporary} to the disk"
                    os.fsync(out.fileno())
                step = f"renaming {temporary} to {path}"
                os.replace(temporary, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
            step = f"flushing the directory {path.parent} to the disk (the file is renamed)"
            _sync_directory(path.parent)
        except OSError as exc:
            raise StateNotSaved(
                f"the policy state of application {app_name!r} was not saved to {path}: "
                f"{step} failed: {exc.strerror or exc}"
            ) from exc

    def _set_aside(self, path: Path, why: str) -> None:
        stale = path.with_suffix(".stale")
        log.warning("not loading the policy state in %s: %s; moved to %s", path, why, stale)
        try:
            os.replace(path, stale)
        except OSError:
            pass


def _sync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries (a rename into it) to the disk."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    except OSError as exc:
        if exc.errno not in _DIRECTORY_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(descriptor)
