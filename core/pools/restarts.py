"""When to restart a worker that exited, and when to stop trying: a pure decision."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How a model's crashed workers are replaced.

    :param first_delay_s: wait before restarting after the first quick exit (or any exit after
        a stable run); doubled for each further quick exit in a row.
    :param max_delay_s: longest wait between restarts.
    :param stable_run_s: a worker that ran this long before exiting did not crash-loop, and
        resets the count.
    :param max_quick_exits: this many quick exits in a row mark the model unhealthy: restarting
        forever would hide the fault and burn CPU.
    """

    first_delay_s: float = 0.1
    max_delay_s: float = 10.0
    stable_run_s: float = 10.0
    max_quick_exits: int = 5


class CrashHistory:
    """One model version's recent exits, and what to do about the next one."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.quick_exits = 0
        self.restarts = 0

    def restart_delay(self, lived_s: float) -> float | None:
        """Seconds to wait before replacing a worker that lived ``lived_s``; ``None`` means
        give up: the model is unhealthy."""
        policy = self.policy
        if lived_s >= policy.stable_run_s:
            self.quick_exits = 0
            delay = policy.first_delay_s
        else:
            self.quick_exits += 1
            if self.quick_exits >= policy.max_quick_exits:
                return None
            delay = min(policy.first_delay_s * 2 ** (self.quick_exits - 1), policy.max_delay_s)
        self.restarts += 1
        return delay
