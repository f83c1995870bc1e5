"""The tuner's parts: arrival envelopes, planned and live, and the replicas a planned model is
asked to run as its traffic leaves the plan and comes back."""

from __future__ import annotations

import pytest

from ketch.planning.tuner import LiveEnvelope, Tuner, envelope


def test_the_envelope_is_the_most_arrivals_any_window_held() -> None:
    arrivals = [0.0, 0.01, 0.02, 0.5, 1.2, 1.25, 1.3, 1.31, 9.0]
    assert envelope(arrivals, (0.1, 1.0, 10.0)) == {0.1: 3, 1.0: 5, 10.0: 9}


def test_the_live_envelope_follows_a_counter_within_its_history() -> None:
    live = LiveEnvelope((0.1, 1.0), history_s=5.0)
    count = 0
    for step in range(100):  # 10 arrivals a second for 10 s, sampled every 0.1 s
        count += 1
        live.sample(step * 0.1, count)
    assert live.peaks() == {0.1: 1, 1.0: pytest.approx(10, abs=1)}
    count += 50  # a burst of 50 at once
    live.sample(10.0, count)
    assert live.peaks()[0.1] == 50  # the burst, in the 0.1 s after the sample before it
    for step in range(1, 80):  # quiet again: the burst leaves the 5 s history
        live.sample(10.0 + step * 0.1, count)
    assert live.peaks() == {0.1: 0, 1.0: 0}


def test_the_tuner_scales_up_at_once_and_down_after_the_hold() -> None:
    planned = Tuner(planned_replicas=2, planned_peaks={1.0: 10}, history_s=1.0, hold_s=2.0)
    count, now = 0, 0.0
    for _ in range(30):  # within the plan: 10 a second
        now += 0.1
        count += 1
        assert planned.update(now, count) == 2
    for _ in range(10):  # three times the plan
        now += 0.1
        count += 3
        wanted = planned.update(now, count)
    assert wanted == 6
    for _ in range(25):  # back within the plan: the burst leaves the history, then the hold
        now += 0.1
        count += 1
        assert planned.update(now, count) == 6
    for _ in range(30):
        now += 0.1
        count += 1
        wanted = planned.update(now, count)
    assert wanted == 2
