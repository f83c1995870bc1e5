"""When is a silent peer dead? A pure decision, shared by the broker and the worker."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_INTERVAL_S = 1.0
DEFAULT_LIVENESS = 3


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Heartbeat settings: send one every ``interval_s``; a peer silent for ``liveness``
    intervals is dead. Three intervals tolerate a lost heartbeat and a busy event loop
    without dropping a healthy peer."""

    interval_s: float = DEFAULT_INTERVAL_S
    liveness: int = DEFAULT_LIVENESS

    def __post_init__(self) -> None:
        if not math.isfinite(self.interval_s) or self.interval_s <= 0:
            raise ValueError(f"heartbeat interval must be > 0 s, got {self.interval_s}")
        if self.liveness < 1:
            raise ValueError(f"heartbeat liveness must be >= 1, got {self.liveness}")

    @property
    def timeout_s(self) -> float:
        return self.interval_s * self.liveness


def peer_expired(last_heard: float, now: float, heartbeat: Heartbeat) -> bool:
    """True when a peer last heard at ``last_heard`` (monotonic seconds) is dead at ``now``."""
    return now - last_heard > heartbeat.timeout_s
