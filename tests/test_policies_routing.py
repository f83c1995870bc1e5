"""Unit tests of the policies that send each query to one model: single, split and shadow."""

from __future__ import annotations

import pytest

from ketch.plugins.shadow import ShadowPolicy
from ketch.plugins.single import SinglePolicy
from ketch.plugins.split import SplitPolicy
from tests.policy_helpers import combined, only, query

# --- single, split, shadow --------------------------------------------------------------------


def test_single() -> None:
    policy = SinglePolicy(["m"])
    assert list(policy.select(query())) == ["m"]
    result = combined(policy.combine(query(), {"m": 0.2}))
    assert result.output == 0.2
    assert result.confidence == pytest.approx(0.8)
    assert combined(policy.combine(query(), {"m": "cat"})).confidence is None


def test_split_routes_by_weight() -> None:
    policy = SplitPolicy(["a", "b"], weights={"a": 9, "b": 1}, seed=1)
    picks = [only(policy.select(query(i))) for i in range(5000)]
    assert picks.count("a") / len(picks) == pytest.approx(0.9, abs=0.02)
    assert policy.state_dict() == {"routed": {"a": picks.count("a"), "b": picks.count("b")}}


def test_split_is_equal_by_default_and_skips_unlisted_models() -> None:
    equal = SplitPolicy(["a", "b", "c"], seed=2)
    picks = [only(equal.select(query(i))) for i in range(3000)]
    for model in "abc":
        assert picks.count(model) / len(picks) == pytest.approx(1 / 3, abs=0.04)
    canary = SplitPolicy(["a", "b", "c"], weights={"a": 1, "b": 1}, seed=2)
    assert "c" not in {only(canary.select(query(i))) for i in range(1000)}


def test_split_is_reproducible_with_a_seed() -> None:
    first, second = (SplitPolicy(["a", "b"], seed=7) for _ in range(2))
    assert [first.select(query()) for _ in range(50)] == [second.select(query()) for _ in range(50)]


def test_shadow_serves_the_primary_and_mirrors_the_others() -> None:
    policy = ShadowPolicy(["old", "new", "other"], primary="new")
    assert list(policy.select(query())) == ["new"]
    assert list(policy.mirror(query())) == ["old", "other"]
    assert combined(policy.combine(query(), {"new": 0.9})).output == 0.9
    assert list(ShadowPolicy(["a", "b"]).select(query())) == ["a"]


def test_shadow_counts_agreement() -> None:
    policy = ShadowPolicy(["prod", "cand", "slow"], tolerance=0.01)
    policy.compare(query(), {"prod": 0.5}, {"cand": 0.505})  # within the tolerance
    policy.compare(query(), {"prod": 0.5}, {"cand": 0.6, "slow": 0.5})
    policy.compare(query(), {"prod": [1.0, 2.0]}, {"cand": [1.0, 2.001]})
    policy.compare(query(), {"prod": "cat"}, {"cand": "dog"})
    policy.compare(query(), {"prod": "cat"}, {"cand": "cat", "unknown": "cat"})
    shadows = policy.state_dict()["shadows"]
    assert shadows["cand"]["compared"] == 5
    assert shadows["cand"]["agreed"] == 3
    assert shadows["cand"]["agreement"] == pytest.approx(0.6)
    # numeric comparisons only: |0.005|, |0.1| and the list's mean 0.0005
    assert shadows["cand"]["mean_abs_diff"] == pytest.approx((0.005 + 0.1 + 0.0005) / 3)
    assert shadows["slow"] == {
        "compared": 1,
        "agreed": 1,
        "agreement": 1.0,
        "mean_abs_diff": 0.0,
        "numeric_compared": 1,
    }
    assert "unknown" not in shadows


def test_shadow_without_comparisons_reports_none() -> None:
    policy = ShadowPolicy(["prod", "cand"])
    policy.compare(query(), {}, {"cand": 1.0})  # the primary missed its deadline
    policy.compare(query(), {"prod": "a"}, {"cand": "b"})
    shadow = policy.state_dict()["shadows"]["cand"]
    assert shadow["compared"] == 1
    assert shadow["agreement"] == 0.0
    assert shadow["mean_abs_diff"] is None
    assert ShadowPolicy(["prod", "cand"]).state_dict()["shadows"]["cand"]["agreement"] is None
