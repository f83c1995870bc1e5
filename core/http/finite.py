"""Finding the NaN or infinity in a model's answer, which JSON has no way to write.

orjson writes each of them as ``null``, which would tell the client that the model had no
answer where it had one; the prediction routes refuse such an answer with a 500 instead
(``docs/http-api.md``). Finding the value costs nothing for the usual answer: orjson writes
every non-finite number as ``null``, so an encoded answer without ``null`` in it has none, and
only the others are walked.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np


def first_non_finite(value: Any, path: str = "") -> tuple[str, float] | None:
    """The first NaN or infinity in ``value`` (in the order JSON would write it) as its path
    (``outputs[2].score``, below ``path``) and the number, or None when it has none."""
    pending: list[tuple[str, Any]] = [(path, value)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, float | np.floating):
            if not math.isfinite(item):
                return where, float(item)
        elif isinstance(item, np.ndarray):
            if item.dtype.kind == "f":
                bad = np.argwhere(~np.isfinite(item))
                if len(bad):
                    index = tuple(int(i) for i in bad[0])
                    return where + "".join(f"[{i}]" for i in index), float(item[index])
            elif item.dtype.kind == "O":
                pending.append((where, item.tolist()))
        elif isinstance(item, dict):
            pending.extend((_key_path(where, k), v) for k, v in reversed(item.items()))
        elif isinstance(item, list | tuple):
            pending.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, msgspec.Struct):
            pending.append((where, msgspec.to_builtins(item)))
    return None


def non_finite_name(number: float) -> str:
    """How JavaScript (and Python's json module) writes a non-finite number."""
    if math.isnan(number):
        return "NaN"
    return "Infinity" if number > 0 else "-Infinity"


def _key_path(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)
