"""Unit tests of the policies that ask several models and combine answers: ensemble, cascade."""

from __future__ import annotations

import math

import pytest

from ketch.plugins.cascade import CascadePolicy
from ketch.plugins.ensemble import EnsemblePolicy
from tests.policy_helpers import combined, query

# --- ensemble ----------------------------------------------------------------------------------


def test_ensemble_mean_and_confidence() -> None:
    policy = EnsemblePolicy(["a", "b", "c"])
    assert list(policy.select(query())) == ["a", "b", "c"]
    result = combined(policy.combine(query(), {"a": 1, "b": 2.0, "c": 3}))
    assert result.output == pytest.approx(2.0)
    assert type(result.output) is float
    assert result.confidence == pytest.approx(1 / (1 + math.sqrt(2 / 3)))
    agreeing = combined(policy.combine(query(), {"a": 0.4, "b": 0.4}))
    assert agreeing.confidence == pytest.approx(1.0)


def test_ensemble_weighted_mean_of_lists() -> None:
    policy = EnsemblePolicy(["a", "b"], weights={"a": 3, "b": 1})
    result = combined(policy.combine(query(), {"a": [0.0, 1.0], "b": [1.0, 1.0]}))
    assert result.output == pytest.approx([0.25, 1.0])
    assert all(type(v) is float for v in result.output)
    # weighted std: sqrt(0.75 * 0.25**2 + 0.25 * 0.75**2) for the first element, 0 for the second
    assert result.confidence == pytest.approx(1 / (1 + math.sqrt(0.1875) / 2))


def test_ensemble_renormalises_over_the_models_that_answered() -> None:
    policy = EnsemblePolicy(["a", "b", "c"], weights={"a": 1, "b": 1, "c": 2})
    result = combined(policy.combine(query(), {"a": 1.0, "c": 4.0}))  # b missed the deadline
    assert result.output == pytest.approx(3.0)
    alone = combined(policy.combine(query(), {"b": 5.0}))
    assert alone.output == 5.0
    assert alone.confidence == 1.0
    assert policy.state_dict() == {"combined": 2, "answered": {"a": 1, "b": 1, "c": 1}}


def test_ensemble_votes_on_labels() -> None:
    policy = EnsemblePolicy(["a", "b", "c"])
    result = combined(policy.combine(query(), {"a": "cat", "b": "dog", "c": "dog"}))
    assert result.output == "dog"
    assert result.confidence == pytest.approx(2 / 3)
    # equal JSON is one answer, whatever the key order
    same = combined(policy.combine(query(), {"a": {"x": 1, "y": 2}, "b": {"y": 2, "x": 1}}))
    assert same.output == {"x": 1, "y": 2}
    assert same.confidence == 1.0


def test_ensemble_vote_ties_go_to_the_first_model() -> None:
    policy = EnsemblePolicy(["a", "b", "c", "d"])
    result = combined(policy.combine(query(), {"d": "x", "c": "y", "b": "x", "a": "y"}))
    assert result.output == "y"
    assert result.confidence == 0.5
    weighted = EnsemblePolicy(["a", "b", "c"], weights={"a": 1, "b": 0.5, "c": 0.7})
    assert combined(weighted.combine(query(), {"a": "x", "b": "y", "c": "y"})).output == "y"


def test_ensemble_methods() -> None:
    mixed = {"a": 1, "b": "1", "c": 1}
    assert combined(EnsemblePolicy(["a", "b", "c"]).combine(query(), mixed)).output == 1
    numbers = {"a": 1, "b": 2, "c": 2}
    voted = combined(EnsemblePolicy(["a", "b", "c"], method="vote").combine(query(), numbers))
    assert voted.output == 2
    assert voted.confidence == pytest.approx(2 / 3)
    # bools are labels, and lists of different lengths cannot be averaged
    flags = {"a": True, "b": False, "c": False}
    assert combined(EnsemblePolicy(["a", "b", "c"]).combine(query(), flags)).output is False
    ragged = {"a": [1.0], "b": [1.0, 2.0], "c": [1.0]}
    assert combined(
        EnsemblePolicy(["a", "b", "c"], method="mean").combine(query(), ragged)
    ).output == [1.0]


def test_ensemble_does_not_ask_models_without_weight() -> None:
    policy = EnsemblePolicy(["a", "b", "c"], weights={"a": 1, "c": 1})
    assert list(policy.select(query())) == ["a", "c"]


# --- cascade -----------------------------------------------------------------------------------


def test_cascade_escalates_only_when_unsure() -> None:
    policy = CascadePolicy(["small", "medium", "large"], threshold=0.9)
    q = query()
    assert list(policy.select(q)) == ["small"]
    assert list(policy.escalate(q, {"small": 0.95})) == []  # confident
    assert list(policy.escalate(q, {"small": 0.02})) == []  # confident it is a 0
    q = query(1)
    policy.select(q)
    assert list(policy.escalate(q, {"small": 0.6})) == ["medium"]
    assert list(policy.escalate(q, {"small": 0.6, "medium": [0.3, 0.7]})) == ["large"]
    assert list(policy.escalate(q, {"small": 0.6, "medium": 0.5, "large": 0.5})) == []
    result = combined(policy.combine(q, {"small": 0.6, "medium": 0.5, "large": 0.55}))
    assert result.output == 0.55
    assert result.confidence == pytest.approx(0.55)
    assert policy.state_dict() == {
        "answered_by": {"small": 0, "medium": 0, "large": 1},
        "escalations": 2,
        "unknown_confidence": 0,
    }


def test_cascade_escalates_when_confidence_is_unknown() -> None:
    policy = CascadePolicy(["small", "large"])
    q = query()
    policy.select(q)
    assert list(policy.escalate(q, {"small": "cat"})) == ["large"]
    assert list(policy.escalate(q, {"small": {"label": "cat", "confidence": 0.99}})) == []
    assert policy.state_dict()["unknown_confidence"] == 1


def test_cascade_with_missing_stages() -> None:
    policy = CascadePolicy(["small", "medium", "large"])
    q = query()
    policy.select(q)
    # the first stage failed: the next one is asked rather than answering nothing
    assert list(policy.escalate(q, {})) == ["medium"]
    # medium failed too, small had not answered: large is next, never medium again
    assert list(policy.escalate(q, {})) == ["large"]
    assert list(policy.escalate(q, {})) == []
    q = query(1)
    policy.select(q)
    assert list(policy.escalate(q, {"small": 0.5})) == ["medium"]
    # medium missed its deadline: the answer is small's, the latest stage that answered
    result = combined(policy.combine(q, {"small": 0.5}))
    assert result.output == 0.5
    assert policy.state_dict()["answered_by"]["small"] == 1
