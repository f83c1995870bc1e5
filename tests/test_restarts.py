"""The restart decision for crashed workers."""

from __future__ import annotations

from ketch.pools.restarts import CrashHistory, RestartPolicy

POLICY = RestartPolicy(first_delay_s=0.1, max_delay_s=0.5, stable_run_s=10, max_quick_exits=5)


def test_quick_exits_back_off_exponentially_up_to_the_cap() -> None:
    history = CrashHistory(POLICY)
    assert [history.restart_delay(1.0) for _ in range(4)] == [0.1, 0.2, 0.4, 0.5]
    assert history.restarts == 4


def test_too_many_quick_exits_in_a_row_give_up() -> None:
    history = CrashHistory(POLICY)
    delays = [history.restart_delay(0.5) for _ in range(5)]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.5]
    assert delays[4] is None
    assert history.restarts == 4


def test_a_stable_run_resets_the_count() -> None:
    history = CrashHistory(POLICY)
    for _ in range(4):
        history.restart_delay(0.5)
    assert history.restart_delay(10.0) == 0.1
    assert history.quick_exits == 0
    assert history.restart_delay(0.5) == 0.1
