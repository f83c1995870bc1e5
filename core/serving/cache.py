"""The prediction cache: one LRU per model version, keyed by a hash of each canonical input.

Opt-in per model with ``cache_size`` (entries, or bytes as ``"64MB"``). An input's key is a
128-bit BLAKE2b digest of its canonical JSON (object keys sorted, numpy arrays as their
values), so ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}`` share an entry. Each model version
has its own cache, so a new version never answers with an old version's outputs. Hits are
answered in the gateway and never reach a worker.
"""

from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict
from typing import Any

import numpy as np
import orjson

_CANONICAL = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY
#: Bookkeeping per entry (key, links, the entry's tuple), counted against a byte budget.
_ENTRY_OVERHEAD = 160


def input_key(value: Any) -> bytes:
    """The cache key of one input (raises ``TypeError`` for values JSON cannot hold)."""
    return hashlib.blake2b(orjson.dumps(value, option=_CANONICAL), digest_size=16).digest()


def _size_of(output: Any) -> int:
    if isinstance(output, np.ndarray):
        return output.nbytes + _ENTRY_OVERHEAD
    try:
        return len(orjson.dumps(output, option=orjson.OPT_SERIALIZE_NUMPY)) + _ENTRY_OVERHEAD
    except TypeError:
        return sys.getsizeof(output) + _ENTRY_OVERHEAD


class PredictionCache:
    """A least-recently-used map from input keys to outputs, bounded by entries or bytes.

    :param kind: ``"entries"`` or ``"bytes"``.
    :param limit: the most entries, or bytes, it holds.
    """

    def __init__(self, kind: str, limit: int) -> None:
        self._by_bytes = kind == "bytes"
        self._limit = limit
        self._entries: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> tuple[bool, Any]:
        """``(True, output)`` for a cached input, else ``(False, None)``; counts either."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return False, None
        self._entries.move_to_end(key)
        self.hits += 1
        return True, entry[0]

    def put(self, key: bytes, output: Any) -> None:
        if isinstance(output, np.ndarray):
            output = output.copy()  # a row of the batch's array would pin the whole batch
        size = _size_of(output) if self._by_bytes else 1
        if size > self._limit:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._entries[key] = (output, size)
        self._bytes += size
        while self._bytes > self._limit:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted

    def describe(self) -> dict[str, Any]:
        return {
            "entries": len(self._entries),
            "bytes": self._bytes if self._by_bytes else None,
            "limit": self._limit,
            "limit_unit": "bytes" if self._by_bytes else "entries",
            "hits": self.hits,
            "misses": self.misses,
        }
