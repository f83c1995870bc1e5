"""The restart decision for crashed workers."""

from __future__ import annotations

import signal

from ketch.pools.restarts import KILLED_FROM_OUTSIDE, CrashHistory, RestartPolicy

POLICY = RestartPolicy(first_delay_s=0.1, max_delay_s=0.5, stable_run_s=10, crash_loop_after=5)


def test_quick_exits_back_off_exponentially_up_to_the_cap() -> None:
    history = CrashHistory(POLICY)
    assert [history.restart_delay(1.0) for _ in range(4)] == [0.1, 0.2, 0.4, 0.5]
    assert history.restarts == 4


def test_a_crash_loop_keeps_trying_at_the_cap() -> None:
    history = CrashHistory(POLICY)
    delays = [history.restart_delay(0.5) for _ in range(8)]
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert history.crash_looping and history.quick_exits == 8


def test_the_default_cap_is_five_minutes() -> None:
    history = CrashHistory(RestartPolicy())
    delays = [history.restart_delay(0.5) for _ in range(20)]
    assert max(delays) == 300.0 and delays[-1] == 300.0


def test_a_stable_run_resets_the_count() -> None:
    history = CrashHistory(POLICY)
    for _ in range(4):
        history.restart_delay(0.5)
    assert history.restart_delay(10.0) == 0.1
    assert history.quick_exits == 0
    assert history.restart_delay(0.5) == 0.1


def test_a_kill_from_outside_after_joining_is_not_a_crash() -> None:
    assert {-signal.SIGKILL, -signal.SIGTERM} == KILLED_FROM_OUTSIDE
    history = CrashHistory(POLICY)
    for _ in range(20):
        assert history.restart_delay(0.5, killed_after_joining=True) == 0.1
    assert history.quick_exits == 0 and not history.crash_looping
