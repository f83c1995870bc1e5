"""Discovery's child side: import the served file (or deployed code) and say what it declares.

It runs in a throw-away process, never in the gateway: forked from the shared forkserver
(:func:`declared_payload` through :mod:`ketch.pools.discovery`), or, for code whose
environment the gateway's interpreter lacks, as ``python -m ketch.worker.discover SOURCE FD``
under that environment's interpreter, writing the payload as JSON to file descriptor FD (the
code's own prints go to stderr either way).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import msgspec

from ketch.errors import TargetLoadError
from ketch.specs.loader import import_source, served_declarations
from ketch.specs.models import ModelSpec


def declared_payload(source: str) -> tuple[str, Any]:
    """``("ok", {"models", "deployments", "apps", "pipelines"})`` as plain data, or
    ``("error", why)``."""
    # What the served file prints as it is imported belongs with the workers' output on
    # stderr; the gateway's stdout carries its own status lines.
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        module = import_source(source)
        declared = served_declarations(module)
        folder = Path(getattr(module, "__file__", None) or "./.").resolve().parent
        return "ok", {
            "models": [_env_in(m.spec, folder).to_dict() for m in declared.models],
            "deployments": [d.to_dict() for d in declared.deployments],
            "apps": [a.to_dict() for a in declared.apps],
            "pipelines": [p.to_dict() for p in declared.pipelines],
        }
    except BaseException as exc:
        return "error", str(exc) if isinstance(exc, TargetLoadError) else traceback.format_exc()


def _env_in(spec: ModelSpec, folder: Path) -> ModelSpec:
    """The spec with a relative ``env=`` file taken as relative to the module's folder."""
    env = spec.start.env
    if not isinstance(env, str) or Path(env).is_absolute():
        return spec
    start = msgspec.structs.replace(spec.start, env=str(folder / env))
    return msgspec.structs.replace(spec, start=start)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m ketch.worker.discover SOURCE ANSWER")
    source, answer = argv
    status, payload = declared_payload(source)
    Path(answer).write_text(json.dumps([status, payload]))


if __name__ == "__main__":
    main(sys.argv[1:])
