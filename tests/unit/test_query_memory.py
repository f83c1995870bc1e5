"""The queries an application keeps for feedback: bounded by count and by bytes, oldest
forgotten first, and feedback for a forgotten query answered as for one never asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ketch
from ketch.applications.memory import QUERY_OVERHEAD_BYTES, QueryMemory, encoded_size
from ketch.serving.jobs import PredictionError
from ketch.specs.apps import MAX_QUERIES_KEPT, AppSpec, query_memory_bounds
from tests.unit.fakes import in_loop
from tests.unit.test_applications import Gateway

MIB = 2**20


def test_past_the_count_bound_the_oldest_are_forgotten() -> None:
    memory: QueryMemory[str] = QueryMemory(max_queries=3, max_bytes=10**9)
    for n in range(5):
        memory.remember(f"q{n}", f"record {n}", 10)
    assert [memory.get(f"q{n}") for n in range(5)] == [
        None,
        None,
        "record 2",
        "record 3",
        "record 4",
    ]
    assert len(memory) == 3 and memory.held_bytes == 30


def test_past_the_byte_bound_the_oldest_are_forgotten_and_the_bytes_stay_under_it() -> None:
    memory: QueryMemory[int] = QueryMemory(max_queries=100, max_bytes=1000)
    for n in range(10):
        memory.remember(f"q{n}", n, 300)
        assert memory.held_bytes <= 1000
    assert [n for n in range(10) if f"q{n}" in memory] == [7, 8, 9]
    assert memory.held_bytes == 900


def test_a_query_larger_than_the_byte_bound_is_not_kept_and_takes_the_others_with_it() -> None:
    memory: QueryMemory[str] = QueryMemory(max_queries=100, max_bytes=1000)
    memory.remember("small", "s", 100)
    memory.remember("huge", "h", 5000)
    assert len(memory) == 0 and memory.held_bytes == 0


def test_a_late_prediction_grows_its_query_and_may_push_the_oldest_out() -> None:
    memory: QueryMemory[str] = QueryMemory(max_queries=100, max_bytes=1000)
    memory.remember("old", "o", 400)
    memory.remember("new", "n", 400)
    memory.grow("new", 300)
    assert "old" not in memory and memory.held_bytes == 700
    memory.grow("old", 10_000)  # already forgotten: nothing to count
    assert memory.held_bytes == 700


def test_tighter_bounds_forget_at_once() -> None:
    memory: QueryMemory[int] = QueryMemory(max_queries=10, max_bytes=1000)
    for n in range(5):
        memory.remember(f"q{n}", n, 100)
    memory.bound(max_queries=2, max_bytes=1000)
    assert len(memory) == 2 and "q4" in memory and memory.held_bytes == 200


def test_sizes_are_what_the_values_take_as_json() -> None:
    assert encoded_size("x" * 1000) == 1002
    assert encoded_size([1.5, 2.5]) == len("[1.5,2.5]")
    assert encoded_size(np.zeros(4)) == len("[0.0,0.0,0.0,0.0]")
    assert encoded_size({1: "a"}) == len('{"1":"a"}')
    assert encoded_size(2**70) == len(str(2**70))  # beyond JSON's 64-bit ints: its repr


@pytest.mark.parametrize(
    ("query_memory", "bounds"),
    [
        ("64MiB", (MAX_QUERIES_KEPT, 64 * MIB)),
        ("2KB", (MAX_QUERIES_KEPT, 2000)),
        ("1.5 GiB", (MAX_QUERIES_KEPT, int(1.5 * 2**30))),
        (500, (500, 64 * MIB)),
        (1_000_000, (1_000_000, 64 * MIB)),
    ],
)
def test_query_memory_sets_the_byte_or_the_count_bound(
    query_memory: int | str, bounds: tuple[int, int]
) -> None:
    assert query_memory_bounds(query_memory, "app") == bounds


def test_the_default_bounds_are_100000_queries_and_64_mib() -> None:
    spec = ketch.app("reviews", models=["a"])
    assert spec.query_bounds() == (100_000, 64 * MIB)
    assert AppSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("bad", ["lots", "0MB", "64 TB", 0, -3, True, 1.5, None])
def test_a_query_memory_that_is_neither_is_refused_when_declared(bad: object) -> None:
    with pytest.raises(ValueError) as refused:
        ketch.app("reviews", models=["a"], query_memory=bad)  # type: ignore[arg-type]
    assert str(refused.value) == (
        "query_memory of application 'reviews' must be a number of queries >= 1 or a size "
        f"like '64MB', got {bad!r}"
    )


@in_loop
async def test_feedback_for_a_query_pushed_out_by_bytes_is_the_404_of_an_unknown_one(
    tmp_path: Path,
) -> None:
    gateway = Gateway(tmp_path)
    gateway.serve("length", len)
    # What each query counts: its record, its input as JSON, its notes ({}), the prediction
    # 4000 (also its output); 14 KB holds three.
    each = QUERY_OVERHEAD_BYTES + len('"' + "x" * 4000 + '"') + len("{}") + len("4000")
    app = gateway.add(["length"], query_memory="14KB")
    ids = [(await app.predict("x" * 4000, None))["query_id"] for _ in range(5)]
    status = app.describe()
    assert status["queries_held"] == 3
    assert status["query_bytes_held"] == 3 * each
    with pytest.raises(PredictionError) as forgotten:
        await app.feedback(ids[0], 1.0, None, has_label=False)
    with pytest.raises(PredictionError) as unknown:
        await app.feedback("never-asked", 1.0, None, has_label=False)
    assert forgotten.value.status == unknown.value.status == 404
    assert forgotten.value.body["error"] == unknown.value.body["error"].replace(
        "'never-asked'", repr(ids[0])
    )
    assert "at most 100000 and" in forgotten.value.body["error"]
    assert (await app.feedback(ids[-1], 1.0, None, has_label=False))["rewards"] == {"length": 1.0}
