"""Unit tests for ``ketch.zmq_transport.liveness``: when a silent peer counts as dead."""

from __future__ import annotations

import math

import pytest

from ketch.zmq_transport.liveness import (
    DEFAULT_INTERVAL_S,
    DEFAULT_LIVENESS,
    Heartbeat,
    peer_expired,
)

# Interval and liveness chosen so the timeout (2.0 s) and the times below are exact in binary.
HEARTBEAT = Heartbeat(interval_s=0.5, liveness=4)
LAST_HEARD = 1000.0


def test_timeout_is_interval_times_liveness() -> None:
    assert HEARTBEAT.timeout_s == 2.0
    assert Heartbeat().timeout_s == DEFAULT_INTERVAL_S * DEFAULT_LIVENESS


def test_defaults_tolerate_more_than_one_lost_heartbeat() -> None:
    heartbeat = Heartbeat()
    assert heartbeat.liveness >= 2
    assert not peer_expired(LAST_HEARD, LAST_HEARD + heartbeat.interval_s * 2, heartbeat)


@pytest.mark.parametrize("silence", [0.0, 0.5, 1.0, 1.5, 1.999])
def test_peer_heard_within_timeout_is_alive(silence: float) -> None:
    assert not peer_expired(LAST_HEARD, LAST_HEARD + silence, HEARTBEAT)


def test_peer_silent_for_exactly_the_timeout_is_still_alive() -> None:
    assert not peer_expired(LAST_HEARD, LAST_HEARD + 2.0, HEARTBEAT)


def test_peer_silent_for_the_least_bit_more_than_the_timeout_is_dead() -> None:
    now = math.nextafter(LAST_HEARD + 2.0, math.inf)
    assert peer_expired(LAST_HEARD, now, HEARTBEAT)


@pytest.mark.parametrize("silence", [2.001, 2.5, 60.0])
def test_peer_silent_beyond_the_timeout_is_dead(silence: float) -> None:
    assert peer_expired(LAST_HEARD, LAST_HEARD + silence, HEARTBEAT)


def test_the_boundary_moves_with_liveness() -> None:
    strict = Heartbeat(interval_s=0.5, liveness=1)
    assert not peer_expired(LAST_HEARD, LAST_HEARD + 0.5, strict)
    assert peer_expired(LAST_HEARD, LAST_HEARD + 0.75, strict)
    assert not peer_expired(LAST_HEARD, LAST_HEARD + 0.75, HEARTBEAT)


def test_clock_reading_before_last_heard_is_alive() -> None:
    # A message stamped after `now` was read (race between threads) is no reason to drop a peer.
    assert not peer_expired(LAST_HEARD, LAST_HEARD - 5.0, HEARTBEAT)


@pytest.mark.parametrize("interval", [0.0, -0.1, -1.0])
def test_non_positive_interval_is_refused_naming_it(interval: float) -> None:
    with pytest.raises(ValueError, match=rf"heartbeat interval must be > 0 s, got {interval}"):
        Heartbeat(interval_s=interval)


@pytest.mark.parametrize("liveness", [0, -1])
def test_liveness_below_one_is_refused_naming_it(liveness: int) -> None:
    with pytest.raises(ValueError, match=rf"heartbeat liveness must be >= 1, got {liveness}"):
        Heartbeat(liveness=liveness)


@pytest.mark.parametrize("interval", [math.nan, math.inf])
def test_non_finite_interval_is_refused(interval: float) -> None:
    # With NaN, `peer_expired` is always False (a dead peer is never dropped) and the worker
    # polls with a 0 ms timeout in a busy loop; with inf the worker's `int(timeout_ms)` raises
    # OverflowError. `ketch worker --heartbeat-interval nan` reaches this constructor.
    with pytest.raises(ValueError, match="heartbeat interval"):
        Heartbeat(interval_s=interval)


def test_smallest_valid_settings_are_accepted() -> None:
    heartbeat = Heartbeat(interval_s=0.001, liveness=1)
    assert heartbeat.timeout_s == 0.001


def test_settings_are_immutable() -> None:
    with pytest.raises(AttributeError):
        HEARTBEAT.liveness = 10  # type: ignore[misc]
