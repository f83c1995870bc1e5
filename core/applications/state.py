"""Keep each application's policy state on disk, so a restarted gateway goes on learning.

One JSON file per application under the state directory (``apps/{name}.json``), written
atomically (a temporary file, then a rename) so a crash mid-write leaves the previous state.
The file records the policy and models it was learnt with: state saved for another policy is
not loaded into this one (it is kept aside as ``.stale``). State saved for other models (an
operator linked or unlinked some through the management API) is offered to the same policy,
whose ``load_state_dict`` keeps what it knows of the models it still has.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

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


@dataclass(frozen=True, slots=True)
class SavedState:
    """A policy's state as saved, and the models it was learnt with."""

    state: dict[str, Any]
    models: tuple[str, ...]


class StateStore:
    """Reads and writes the policy state of applications under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path_of(self, app_name: str) -> Path:
        return self.directory / "apps" / f"{app_name}.json"

    def load(self, spec: AppSpec) -> SavedState | None:
        """The state saved for this application with the same policy, or None."""
        path = self.path_of(spec.name)
        try:
            saved = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            self._set_aside(path, f"it cannot be read ({exc})")
            return None
        if (
            not isinstance(saved, dict)
            or saved.get("policy") != spec.policy
            or not isinstance(saved.get("models"), list)
            or not isinstance(saved.get("state"), dict)
        ):
            self._set_aside(
                path,
                f"it was saved for policy {saved.get('policy')!r}, not {spec.policy!r}"
                if isinstance(saved, dict)
                else "it is not a JSON object",
            )
            return None
        return SavedState(saved["state"], tuple(saved["models"]))

    def set_aside(self, app_name: str, why: str) -> None:
        """Keep the application's saved state out of the way (``.stale``), saying ``why``."""
        self._set_aside(self.path_of(app_name), why)

    def save(self, spec: AppSpec, state: dict[str, Any]) -> None:
        """Write ``state`` for the application; raises ``TypeError`` when it is not JSON."""
        content = orjson.dumps(
            {"app": spec.name, "policy": spec.policy, "models": list(spec.models), "state": state},
            option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_INDENT_2,
        )
        path = self.path_of(spec.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{spec.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(content)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise

    def _set_aside(self, path: Path, why: str) -> None:
        stale = path.with_suffix(".stale")
        log.warning("not loading the policy state in %s: %s; moved to %s", path, why, stale)
        try:
            os.replace(path, stale)
        except OSError:
            pass
