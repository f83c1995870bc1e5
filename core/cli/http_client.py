"""Requests to a running ketch server, for ``ketch status``, ``ketch models ...`` and
``ketch apps ...``.

Only the standard library (urllib): these commands must work wherever ketch is installed,
including on a machine that only runs ``ketch worker``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from ketch.errors import KetchError

DEFAULT_URL = "http://127.0.0.1:8000"
#: A server that does not answer a read in this long is as good as unreachable.
READ_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Upload:
    """A request body read as it is sent (an archive), with its type and size."""

    reader: Any  # anything with read(size) -> bytes
    size: int
    content_type: str


class ServerError(KetchError):
    """The server answered, with an error status: ``message`` is its ``"error"`` text."""

    def __init__(self, message: str, status: int, body: Any) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.message = message
        self.status = status
        self.body = body


def request_json(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
    timeout_s: float | None = READ_TIMEOUT_S,
    upload: Upload | None = None,
) -> Any:
    """The JSON answer of ``method url+path``, sending ``body`` as JSON (unless None), or
    ``upload``'s bytes as they are read, and ``token`` as a bearer token (unless None).

    :param timeout_s: the longest wait for the connection and for each read; None waits as
        long as the server takes.
    :raises ServerError: the server answered with an error status.
    :raises KetchError: the server cannot be reached, or did not answer JSON.
    """
    address = url.rstrip("/") + path
    headers = {"Accept": "application/json"}
    data: Any = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    elif upload is not None:
        data = upload.reader
        headers["Content-Type"] = upload.content_type
        headers["Content-Length"] = str(upload.size)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(address, data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        with exc:
            error_body = _json_or_none(exc.read())
        raise ServerError(_error_text(error_body, exc.reason), exc.code, error_body) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise KetchError(f"cannot reach {address}: {reason}") from None
    except ValueError as exc:
        raise KetchError(f"{address} did not answer JSON ({exc}): is it a ketch server?") from None


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None  # a proxy's HTML error page, say


def _error_text(body: Any, reason: str) -> str:
    """The server's ``"error"`` text, else the HTTP reason phrase (an answer not from ketch)."""
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, str) else str(reason)
