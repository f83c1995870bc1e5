"""The pure parts of batching: the AIMD batch sizer, the prediction cache, and their options."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import ketch
from ketch.serving.batching import BatchSizer, batch_latency_target_s
from ketch.serving.cache import PredictionCache, input_key
from ketch.specs.models import cache_limit


def latency_s(batch_size: int) -> float:
    """A model that takes 5 ms per call plus 2 ms per input."""
    return 0.005 + 0.002 * batch_size


def run(sizer: BatchSizer, batches: int) -> list[int]:
    """Feed ``sizer`` full batches of its current limit; the limits it chose, in order."""
    limits = []
    for _ in range(batches):
        limit = sizer.limit
        sizer.observe(limit, latency_s(limit))
        limits.append(limit)
    return limits


def test_target_leaves_room_for_a_wait_and_the_delay() -> None:
    assert batch_latency_target_s(100, 0) == pytest.approx(0.05)
    assert batch_latency_target_s(100, 20) == pytest.approx(0.04)


def test_sizer_starts_at_one_and_converges_below_the_target() -> None:
    sizer = BatchSizer(target_s=0.03, max_size=64)
    limits = run(sizer, 200)
    assert limits[0] == 1
    # 5 + 2n ms stays under 30 ms up to n = 12: the limit climbs there and stays near it.
    settled = limits[100:]
    assert max(settled) <= 12
    assert min(settled) >= 8
    assert all(latency_s(n) <= 0.03 for n in settled)


def test_sizer_doubles_until_its_first_slow_batch_then_adds_one() -> None:
    sizer = BatchSizer(target_s=0.03, max_size=64)
    assert run(sizer, 6) == [1, 2, 4, 8, 16, 12]  # 16 took 37 ms: cut to 30/37 of it
    assert run(sizer, 2) == [12, 12]  # 29 ms: under the target, not comfortably
    sizer = BatchSizer(target_s=0.03, max_size=64, size=9, slow_start=False)
    assert run(sizer, 3) == [9, 10, 10]  # additive: 10 takes 25 ms, not under 0.8 x 30


def test_sizer_shrinks_multiplicatively_when_a_batch_is_too_slow() -> None:
    sizer = BatchSizer(target_s=0.03, max_size=64, size=40)
    sizer.observe(40, 0.120)  # four times the target: shrink to a quarter, not by 10%
    assert sizer.limit == 10
    sizer.observe(10, 0.033)  # just over: at least 10% off
    assert sizer.limit == 9
    for _ in range(50):
        sizer.observe(sizer.limit, 1.0)
    assert sizer.limit == 1  # never below one


def test_sizer_grows_only_on_full_batches_and_never_past_max() -> None:
    sizer = BatchSizer(target_s=0.05, max_size=4)
    sizer.observe(1, 0.001)
    assert sizer.limit == 2
    sizer.observe(1, 0.001)  # light load: a batch below the limit is no reason to grow
    assert sizer.limit == 2
    for _ in range(10):
        sizer.observe(sizer.limit, 0.001)
    assert sizer.limit == 4


def test_cache_evicts_the_least_recently_used_entry() -> None:
    cache = PredictionCache("entries", 2)
    cache.put(b"a", 1)
    cache.put(b"b", 2)
    assert cache.get(b"a") == (True, 1)  # a is now the most recent
    cache.put(b"c", 3)
    assert cache.get(b"b") == (False, None)
    assert cache.get(b"a") == (True, 1) and cache.get(b"c") == (True, 3)
    assert (cache.hits, cache.misses) == (3, 1)


def test_cache_by_bytes_keeps_its_budget_and_skips_oversized_outputs() -> None:
    row = np.zeros(100, dtype=np.float64)  # 800 bytes each
    cache = PredictionCache("bytes", 3000)
    for key in (b"1", b"2", b"3", b"4"):
        cache.put(key, row)
    assert cache.describe()["entries"] == 3
    assert cache.describe()["bytes"] <= 3000
    cache.put(b"huge", np.zeros(10_000))
    assert cache.get(b"huge") == (False, None)


def test_cached_array_rows_are_copies_not_views_of_the_batch() -> None:
    batch = np.arange(6.0).reshape(3, 2)
    cache = PredictionCache("entries", 10)
    cache.put(b"row", batch[1])
    batch[1] = -1
    assert cache.get(b"row")[1].tolist() == [2.0, 3.0]


def test_input_key_is_canonical() -> None:
    assert input_key({"a": 1, "b": [1, 2]}) == input_key({"b": [1, 2], "a": 1})
    assert input_key([1, 2]) != input_key([2, 1])
    assert input_key(1) != input_key("1")


@pytest.mark.parametrize(
    ("value", "limit"),
    [
        (None, None),
        (10, ("entries", 10)),
        ("64MB", ("bytes", 64_000_000)),
        ("1GiB", ("bytes", 2**30)),
    ],
)
def test_cache_size_takes_entries_or_bytes(value: Any, limit: Any) -> None:
    assert cache_limit(value, "m") == limit


@pytest.mark.parametrize("value", [0, -1, True, "lots", "12 parsecs", 1.5])
def test_bad_cache_size_fails_naming_it(value: Any) -> None:
    with pytest.raises(ValueError, match=f"cache_size of 'm' .* got {value!r}"):
        ketch.model(name="m", cache_size=value)(lambda xs: xs)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_delay_ms": -1}, "max_delay_ms of 'm' must be a number >= 0"),
        ({"slo_ms": 0}, r"slo_ms of 'm' must be a number of milliseconds above max_delay_ms"),
        ({"slo_ms": 10, "max_delay_ms": 10}, "above max_delay_ms \\(10\\)"),
        ({"max_queue": 0}, "max_queue of 'm' must be an int >= 1"),
    ],
)
def test_bad_batching_options_fail_naming_them(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ketch.model(name="m", **options)(lambda xs: xs)
