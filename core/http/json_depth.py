"""How deep a JSON text nests, found without parsing it.

A body nested hundreds of levels deep is no input any model takes, yet it costs: msgspec and
orjson recurse once per level (past Python's recursion limit a decode fails with a
RecursionError), an answer that echoes it cannot be encoded (orjson stops at 255 levels), and
the msgpack frames to a worker recurse as well. So the gateway refuses a body deeper than
:data:`MAX_JSON_DEPTH` with a 400 before decoding it.

The check costs less than the decoding it guards. A text with no more opening brackets than
the limit cannot nest deeper: most bodies (a flat list of numbers, a few fields) pass on that
count alone, made in C by ``bytes.count``. Texts with more (a list of rows) are measured with
numpy, a slice of 1 MiB at a time so that the memory it takes stays small: a bracket inside a
string (between quotes that no odd run of backslashes escapes) is not structure; the running
sum of the others (+1 opening, -1 closing) is the depth.
"""

from __future__ import annotations

import numpy as np

#: The deepest a request body may nest arrays and objects, its own object counted: one level
#: for ``{"input": 1}``, three for ``{"inputs": [[1, 2]]}``.
MAX_JSON_DEPTH = 64

_SLICE = 2**20
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
#: Each byte's step of the depth: +1 for ``[`` and ``{``, -1 for ``]`` and ``}``, else 0.
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def deeper_than(text: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON ``text`` nests arrays and objects more than ``limit`` levels deep
    (for a text that is not JSON the answer means nothing: decoding it will fail)."""
    if text.count(b"[") + text.count(b"{") <= limit:
        return False
    data = np.frombuffer(text, dtype=np.uint8)
    # Carried from one slice to the next: the depth, whether a string is open, and how many
    # backslashes ended the slice (they may escape the next slice's first quote).
    depth, in_string, backslashes_before = 0, 0, 0
    for start in range(0, len(data), _SLICE):
        chunk = data[start : start + _SLICE]
        quotes = chunk == _QUOTE
        backslashes = chunk == _BACKSLASH
        if backslashes_before or backslashes.any():
            quotes &= _run_before(backslashes, backslashes_before) % 2 == 0
            backslashes_before = _run_at_end(backslashes, backslashes_before)
        inside = np.bitwise_xor.accumulate(quotes.view(np.uint8)) ^ in_string
        in_string = int(inside[-1])
        steps = _STEP[chunk]
        steps[inside.view(bool)] = 0
        running = np.cumsum(steps, dtype=np.int32) + depth
        if int(running.max()) > limit:
            return True
        depth = int(running[-1])
    return False


def _run_before(backslashes: np.ndarray, carried: int) -> np.ndarray:
    """For each position, how many backslashes come just before it (``carried`` of them
    ending the previous slice)."""
    index = np.arange(len(backslashes))
    last_other = np.maximum.accumulate(np.where(backslashes, -1, index))
    run = np.empty(len(backslashes), dtype=np.int64)
    run[0] = carried
    run[1:] = index[:-1] - last_other[:-1]
    run[1:][last_other[:-1] == -1] += carried
    return run


def _run_at_end(backslashes: np.ndarray, carried: int) -> int:
    if not backslashes[-1]:
        return 0
    others = np.flatnonzero(~backslashes)
    return len(backslashes) - 1 - int(others[-1]) if len(others) else len(backslashes) + carried
