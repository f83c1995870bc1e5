"""gzip and deflate bodies on the Open Inference Protocol's routes, as Triton takes and gives
them (``tritonclient.http``'s ``request_compression_algorithm`` and
``response_compression_algorithm``).

A compressed request body (``Content-Encoding: gzip`` or ``deflate``) is inflated within the
same limit as any body (``--max-body-mb``): what it inflates to beyond that is a 413, however
small it came, so a few kilobytes cannot make the gateway hold gigabytes. An answer is
compressed when ``Accept-Encoding`` asks for gzip or deflate (the first one named that is not
refused with ``q=0``).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Mapping

from ketch.serving.jobs import PredictionError

#: The zlib window for each encoding: gzip's header, or zlib's (what HTTP calls deflate).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def inflated(raw: bytes, headers: Mapping[str, str], limit: int) -> bytes:
    """The request body ``raw`` without its ``Content-Encoding``; a 413 when it inflates past
    ``limit`` bytes, a 400 when it is not what its encoding says or uses another one."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return raw
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise PredictionError(
            400, f"Content-Encoding {encoding!r} is not supported; use gzip or deflate"
        )
    inflater = zlib.decompressobj(wbits)
    try:
        body = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise PredictionError(400, f"the request body is not valid {encoding}: {exc}") from None
    if len(body) > limit:
        raise PredictionError(
            413, f"the request body inflates to more than the limit of {limit} bytes"
        )
    if not inflater.eof or inflater.unused_data:
        raise PredictionError(400, f"the request body is not one whole {encoding} stream")
    return body


def chosen_encoding(accept_encoding: str | None) -> str | None:
    """gzip or deflate, whichever ``Accept-Encoding`` names first (and does not refuse)."""
    if not accept_encoding:
        return None
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        if name in _WBITS and params.replace(" ", "").lower() not in ("q=0", "q=0.0"):
            return name
    return None


def compressed(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body, compresslevel=6, mtime=0)
    return zlib.compress(body, 6)
