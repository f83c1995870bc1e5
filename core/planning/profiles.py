"""The profiles ``ketch profile`` writes, read back: how long one worker of a model takes on a
batch of each size, per resource option.

Between two measured batch sizes a batch's time is interpolated linearly (a fixed cost per
batch and a cost per item, as accelerators behave); past the largest it is not defined: a plan
never batches beyond what was measured (the model's ``max_batch_size``).
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ProfileError(ValueError):
    """A profile that cannot be read or lacks what a plan needs, said to the user."""


@dataclass(frozen=True, slots=True)
class Option:
    """One resource option of a model: its cores, and its batch times by batch size."""

    cores: int
    sizes: tuple[int, ...]
    p50_s: tuple[float, ...]
    p99_s: tuple[float, ...]

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def times(self, size: int) -> tuple[float, float]:
        """``(p50, p99)`` seconds of a batch of ``size``, interpolated between measured sizes."""
        if not 1 <= size <= self.sizes[-1]:
            raise ValueError(f"batch size {size} outside the profile's 1-{self.sizes[-1]}")
        at = bisect.bisect_left(self.sizes, size)
        if self.sizes[at] == size:
            return self.p50_s[at], self.p99_s[at]
        low, high = at - 1, at
        share = (size - self.sizes[low]) / (self.sizes[high] - self.sizes[low])
        return (
            self.p50_s[low] + share * (self.p50_s[high] - self.p50_s[low]),
            self.p99_s[low] + share * (self.p99_s[high] - self.p99_s[low]),
        )


@dataclass(frozen=True, slots=True)
class ModelProfile:
    name: str
    options: tuple[Option, ...]


def load_profile(path: Path) -> dict[str, ModelProfile]:
    """The models of ``profile.json``; raises :class:`ProfileError` naming what is wrong."""
    try:
        data = json.loads(path.read_text())
        return {name: _model(name, model) for name, model in data["models"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        if isinstance(exc, ProfileError):
            raise
        raise ProfileError(f"{path} is not a profile ketch profile wrote: {exc!r}") from None


def _model(name: str, data: dict[str, Any]) -> ModelProfile:
    options = []
    for option in data["options"]:
        batches = sorted(option["batches"], key=lambda b: int(b["batch_size"]))
        sizes = tuple(int(b["batch_size"]) for b in batches)
        p50 = tuple(float(b["p50_ms"]) / 1000 for b in batches)
        p99 = tuple(max(float(b["p99_ms"]), float(b["p50_ms"])) / 1000 for b in batches)
        if not sizes or sizes[0] != 1 or not all(math.isfinite(t) and t >= 0 for t in p50 + p99):
            raise ProfileError(f"model {name!r}: its batches must start at size 1, with times")
        options.append(Option(len(option["resources"]["cpus"]), sizes, p50, p99))
    if not options:
        raise ProfileError(f"model {name!r} has no resource option in the profile")
    return ModelProfile(name, tuple(sorted(options, key=lambda o: o.cores)))
