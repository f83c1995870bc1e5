"""When to restart a worker that exited, and how long to wait: a pure decision.

A model whose workers keep exiting soon after they start is crash-looping. It is never given
up on: each quick exit in a row doubles the wait before the next start, up to a cap, so a
fault that heals (a dependency back up, a file fixed, memory freed) is found again without a
restart of ketch, while a fault that does not costs one start per cap. An exit from outside
(SIGKILL, SIGTERM) of a worker that had joined is not a crash: an OOM killer or an operator
chose it, and its replacement starts at once.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How a model's crashed workers are replaced.

    :param first_delay_s: wait before restarting after the first quick exit (or any exit after
        a stable run); doubled for each further quick exit in a row.
    :param max_delay_s: longest wait between restarts.
    :param stable_run_s: a worker that ran this long before exiting did not crash-loop, and
        resets the count.
    :param crash_loop_after: this many quick exits in a row make the model crash-looping:
        without a ready worker it answers 503 (with ``Retry-After``) until its next attempt.
    """

    first_delay_s: float = 0.1
    max_delay_s: float = 300.0
    stable_run_s: float = 10.0
    crash_loop_after: int = 5


#: Exit codes of a process killed by a signal someone outside sent (negative signal numbers,
#: as ``multiprocessing`` and ``subprocess`` report them).
KILLED_FROM_OUTSIDE = frozenset({-signal.SIGKILL, -signal.SIGTERM})


class CrashHistory:
    """One model version's recent exits, and what to do about the next one."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.quick_exits = 0
        self.restarts = 0

    @property
    def crash_looping(self) -> bool:
        return self.quick_exits >= self.policy.crash_loop_after

    def restart_delay(self, lived_s: float, *, killed_after_joining: bool = False) -> float:
        """Seconds to wait before replacing a worker that lived ``lived_s``.

        :param killed_after_joining: it had said READY and was then killed from outside
            (:data:`KILLED_FROM_OUTSIDE`): not counted as a quick exit.
        """
        policy = self.policy
        self.restarts += 1
        if killed_after_joining:
            return policy.first_delay_s
        if lived_s >= policy.stable_run_s:
            self.quick_exits = 0
            return policy.first_delay_s
        self.quick_exits += 1
        return min(policy.first_delay_s * 2.0 ** (self.quick_exits - 1), policy.max_delay_s)
