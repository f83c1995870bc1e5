"""The planner's parts in process: profiles read back and interpolated, the pipeline simulator
against cases whose latencies are known exactly, and the greedy planner's choices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ketch.planning.planner import PlanError, plan
from ketch.planning.profiles import ModelProfile, Option, ProfileError, load_profile
from ketch.planning.simulator import ModelConfig, SimStep, poisson_arrivals, simulate

SIZES = (1, 2, 4, 8)


def option(fixed_ms: float, per_item_ms: float, cores: int = 1, tail: float = 1.0) -> Option:
    """A model that takes a fixed time per batch and a time per item (p99 = ``tail`` x p50)."""
    p50 = tuple((fixed_ms + per_item_ms * size) / 1000 for size in SIZES)
    return Option(cores, SIZES, p50, tuple(t * tail for t in p50))


def config(opt: Option, batch: int = 1, replicas: int = 1, delay_ms: float = 0) -> ModelConfig:
    return ModelConfig(batch_size=batch, replicas=replicas, option=opt, max_delay_s=delay_ms / 1000)


def test_batch_times_are_interpolated_between_the_measured_sizes() -> None:
    opt = option(4, 1)
    assert opt.times(4) == pytest.approx((0.008, 0.008))
    assert opt.times(6) == pytest.approx((0.010, 0.010))  # between 4 (8 ms) and 8 (12 ms)
    with pytest.raises(ValueError, match="outside the profile's 1-8"):
        opt.times(9)


def test_a_profile_is_read_back_as_ketch_profile_wrote_it(tmp_path: Path) -> None:
    batches = [
        {"batch_size": 2, "p50_ms": 3.0, "p99_ms": 4.0},
        {"batch_size": 1, "p50_ms": 2.0, "p99_ms": 2.5},
    ]
    options = [{"resources": {"cpus": [0, 1], "threads": 2}, "batches": batches}]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"models": {"a": {"options": options}}}))
    (read,) = load_profile(path)["a"].options
    assert (read.cores, read.sizes) == (2, (1, 2))
    assert read.times(2) == pytest.approx((0.003, 0.004))
    path.write_text(json.dumps({"models": {"a": {"options": []}}}))
    with pytest.raises(ProfileError, match="model 'a' has no resource option"):
        load_profile(path)
    path.write_text("{}")
    with pytest.raises(ProfileError, match="is not a profile ketch profile wrote"):
        load_profile(path)


def test_queries_far_apart_take_the_sum_of_their_steps() -> None:
    configs = {"a": config(option(2, 1)), "b": config(option(5, 0))}
    steps = [SimStep(("a",)), SimStep(("b",))]
    outcome = simulate(steps, configs, [0.0, 1.0, 2.0])
    assert outcome.latencies_s == pytest.approx([0.008] * 3)  # a: 3 ms, b: 5 ms
    assert outcome.model_latencies_s["a"] == pytest.approx([0.003] * 3)


def test_a_burst_is_batched_up_to_the_batch_size_and_queued_past_it() -> None:
    burst = [0.0] * 8
    batched = simulate([SimStep(("a",))], {"a": config(option(4, 1), batch=8)}, burst)
    # As ketch's queue does with no max_delay: the first goes alone to the idle worker, the
    # seven that came with it wait for it and go as one batch (5 ms, then 11 ms).
    assert batched.latencies_s == pytest.approx([0.005] + [0.016] * 7)
    # One at a time, one replica: the k-th waits for the k-1 before it.
    serial = simulate([SimStep(("a",))], {"a": config(option(4, 1))}, burst)
    assert sorted(serial.latencies_s) == pytest.approx([0.005 * k for k in range(1, 9)])
    # Two replicas halve the queue.
    two = simulate([SimStep(("a",))], {"a": config(option(4, 1), replicas=2)}, burst)
    assert max(two.latencies_s) == pytest.approx(0.020)


def test_max_delay_holds_the_oldest_for_a_fuller_batch() -> None:
    arrivals = [0.0, 0.002]
    eager = simulate([SimStep(("a",))], {"a": config(option(4, 1), batch=2)}, arrivals)
    assert sorted(eager.latencies_s) == pytest.approx([0.005, 0.008])  # second waits for first
    held = simulate([SimStep(("a",))], {"a": config(option(4, 1), batch=2, delay_ms=5)}, arrivals)
    # Both left together once the second came (the batch was full): 6 ms for two items.
    assert sorted(held.latencies_s) == pytest.approx([0.006, 0.008])


def test_a_parallel_step_waits_for_its_slowest_model_and_a_share_skips_steps() -> None:
    configs = {"a": config(option(2, 0)), "b": config(option(7, 0)), "c": config(option(1, 0))}
    joined = simulate([SimStep(("a", "b"))], configs, [0.0])
    assert joined.latencies_s == pytest.approx([0.007])
    never = simulate([SimStep(("a",)), SimStep(("c",), share=0.0)], configs, [0.0, 1.0])
    assert never.latencies_s == pytest.approx([0.002, 0.002])
    assert never.model_latencies_s["c"] == []
    arrivals = [float(i) for i in range(1000)]
    sometimes = simulate([SimStep(("a",)), SimStep(("c",), share=0.3)], configs, arrivals)
    assert 250 <= len(sometimes.model_latencies_s["c"]) <= 350


def test_tails_follow_the_profile() -> None:
    arrivals = [float(i) for i in range(2000)]
    outcome = simulate([SimStep(("a",))], {"a": config(option(10, 0, tail=3.0))}, arrivals)
    assert outcome.p99_s == pytest.approx(0.030, rel=0.25)
    assert sorted(outcome.latencies_s)[1000] == pytest.approx(0.010, rel=0.1)


PROFILES = {
    "a": ModelProfile("a", (option(5, 1), option(4, 0.6, cores=2))),
    "b": ModelProfile("b", (option(10, 2), option(8, 1.2, cores=2))),
}
STEPS = [SimStep(("a",)), SimStep(("b",))]


def test_the_plan_meets_the_objective_and_a_looser_one_costs_no_more() -> None:
    arrivals = poisson_arrivals(150, 3000, seed=1)
    tight = plan(STEPS, PROFILES, 0.060, arrivals)
    loose = plan(STEPS, PROFILES, 0.200, arrivals)
    assert tight.p99_s <= 0.060 and loose.p99_s <= 0.200
    assert loose.cost <= tight.cost
    # Under this load one worker at batch size 1 cannot keep up with b (12 ms an item at
    # 150/s): the plan batches it or adds replicas.
    b = tight.configs["b"]
    assert b.batch_size > 1 or b.replicas > 1
    assert simulate(STEPS, tight.configs, arrivals).p99_s == pytest.approx(tight.p99_s)


def test_an_objective_out_of_reach_is_refused_with_the_reason() -> None:
    arrivals = poisson_arrivals(10, 100, seed=1)
    with pytest.raises(PlanError, match="one query alone takes"):
        plan(STEPS, PROFILES, 0.005, arrivals)
    with pytest.raises(PlanError, match=r"no measurements of \['c'\]"):
        plan([SimStep(("c",))], PROFILES, 1.0, arrivals)
