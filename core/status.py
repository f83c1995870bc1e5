"""``ketch status``: what a running server is doing, as tables, from ``GET /models`` and
``GET /apps``.

Only the standard library (urllib): the command must work wherever ketch is installed,
including on a machine that only runs ``ketch worker``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from ketch.errors import KetchError

DEFAULT_STATUS_URL = "http://127.0.0.1:8000"
#: A server that does not answer in this long is as good as unreachable for a status check.
TIMEOUT_S = 10.0


def fetch(url: str, path: str) -> Any:
    """The JSON body of ``GET url+path``; raises :class:`KetchError` naming the address."""
    address = url.rstrip("/") + path
    try:
        with urllib.request.urlopen(address, timeout=TIMEOUT_S) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise KetchError(f"cannot read {address}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise KetchError(f"cannot reach {address}: {reason}") from None
    except ValueError as exc:
        raise KetchError(f"{address} did not answer JSON ({exc}): is it a ketch server?") from None


def model_rows(models: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = [
        [
            "MODEL",
            "VERSION",
            "STATE",
            "READY",
            "STARTING",
            "QUEUED",
            "IN FLIGHT",
            "COLD STARTS",
            "RESTARTS",
            "LAST BATCH",
        ]
    ]
    for m in models:
        replicas = m.get("replicas") or {}
        batching = m.get("batching") or {}
        rows.append(
            [
                m["name"] + (" *" if m.get("default") else ""),
                str(m["version"]),
                str(m.get("state", "?")),
                _cell(replicas.get("ready")),
                _cell(replicas.get("starting")),
                _cell(m.get("queue_depth")),
                _cell(m.get("in_flight")),
                _cell(m.get("cold_starts")),
                # Unexpected worker exits: each one is a worker the pool starts again.
                _cell(m.get("worker_exits")),
                _cell(batching.get("last_batch_size")),
            ]
        )
    return rows


def app_rows(apps: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = [["APP", "POLICY", "MODELS", "QUERIES", "DEFAULTS", "ERRORS", "FEEDBACK"]]
    for a in apps:
        rows.append(
            [
                str(a["name"]),
                str(a.get("policy", "?")),
                ", ".join(a.get("models", [])),
                _cell(a.get("queries")),
                _cell(a.get("defaults")),
                _cell(a.get("errors")),
                _cell(a.get("feedback")),
            ]
        )
    return rows


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def print_status(url: str) -> int:
    models = fetch(url, "/models").get("models", [])
    apps = fetch(url, "/apps").get("apps", [])
    print(f"ketch at {url}")
    print()
    print(table(model_rows(models)) if models else "no models")
    print("(* the version requests without one get)")
    print()
    print(table(app_rows(apps)) if apps else "no applications")
    return 0


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)
