"""Unit tests of the policies that learn from feedback: the bandits, and exp4's expert weights.

The bandits (epsilon_greedy, ucb1, thompson, exp3) pick one model a query; exp4 asks them all
and combines their answers with weights learnt from labels.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping

import pytest

from ketch.plugins.bandits import EpsilonGreedyPolicy, Exp3Policy, ThompsonPolicy, UCB1Policy
from ketch.plugins.exp4 import Exp4Policy
from ketch.plugins.rewards import ketch_reward_of
from ketch.policy import Feedback, Policy
from tests.policy_helpers import combined, only, query


def feedback(rewards: Mapping[str, float]) -> Feedback:
    """Feedback with a reward for each of ``rewards``' models, as for a bare reward."""
    return Feedback(
        reward=max(rewards.values()),
        label=None,
        output="x",
        predictions=dict.fromkeys(rewards, "x"),
        rewards=rewards,
    )


# --- bandits -----------------------------------------------------------------------------------

BANDITS: dict[str, Callable[[int], Policy]] = {
    "epsilon_greedy": lambda seed: EpsilonGreedyPolicy(["good", "bad"], seed=seed),
    "ucb1": lambda seed: UCB1Policy(["good", "bad"]),
    "thompson": lambda seed: ThompsonPolicy(["good", "bad"], seed=seed),
    "exp3": lambda seed: Exp3Policy(["good", "bad"], seed=seed),
}


def run_bandit(policy: Policy, rounds: int, seed: int) -> list[str]:
    """Bernoulli rewards with rates 0.8 and 0.4; the models the policy picked, in order."""
    environment = random.Random(seed)
    rates = {"good": 0.8, "bad": 0.4}
    picks = []
    for i in range(rounds):
        q = query(i)
        chosen = only(policy.select(q))
        reward = 1.0 if environment.random() < rates[chosen] else 0.0
        policy.observe(
            q,
            Feedback(
                reward=reward,
                label=None,
                output="answer",
                predictions={chosen: "answer"},
                rewards={chosen: reward},
            ),
        )
        picks.append(chosen)
    return picks


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(BANDITS))
def test_bandits_converge_on_the_better_model(name: str, seed: int) -> None:
    picks = run_bandit(BANDITS[name](seed), 1000, seed + 100)
    assert picks[-200:].count("good") >= 160


def test_epsilon_greedy_tries_every_model_first_then_exploits() -> None:
    policy = EpsilonGreedyPolicy(["a", "b", "c"], epsilon=0.0, seed=3)
    first = {only(policy.select(query())) for _ in range(50)}
    assert first == {"a", "b", "c"}  # all untried: drawn at random
    for model, reward in (("a", 0.2), ("b", 0.9), ("c", 0.5)):
        policy.observe(query(), feedback({model: reward}))
    assert {only(policy.select(query())) for _ in range(50)} == {"b"}
    policy.observe(query(), feedback({"b": 0.1}))
    assert policy.state_dict() == {
        "pulls": {"a": 1, "b": 2, "c": 1},
        "mean_reward": {"a": 0.2, "b": pytest.approx(0.5), "c": 0.5},
    }


def test_ucb1_tries_models_in_order_then_balances() -> None:
    policy = UCB1Policy(["a", "b"])
    assert only(policy.select(query())) == "a"
    policy.observe(query(), feedback({"a": 1.0}))
    assert only(policy.select(query())) == "b"
    policy.observe(query(), feedback({"b": 0.0}))
    assert only(policy.select(query())) == "a"
    for _ in range(20):
        policy.observe(query(), feedback({"a": 1.0}))
    # b's bound sqrt(2 ln 22 / 1) = 2.49 beats a's 1 + sqrt(2 ln 22 / 21) = 1.54
    assert only(policy.select(query())) == "b"


def test_thompson_counts_fractional_rewards() -> None:
    policy = ThompsonPolicy(["a", "b"], seed=0)
    policy.observe(query(), feedback({"a": 0.25}))
    policy.observe(query(), feedback({"a": 1.0, "b": 0.0}))
    assert policy.state_dict() == {
        "successes": {"a": 1.25, "b": 0.0},
        "failures": {"a": 0.75, "b": 1.0},
    }


def test_exp3_notes_and_updates() -> None:
    policy = Exp3Policy(["a", "b"], gamma=0.2, seed=0)
    assert policy.state_dict()["probabilities"] == {"a": 0.5, "b": 0.5}
    q = query()
    chosen = only(policy.select(q))
    assert q.notes == {"exp3_p": 0.5, "exp3_model": chosen}
    policy.observe(q, feedback({chosen: 1.0}))
    # log-weight += gamma * (r / p) / K = 0.2 * 2 / 2, then shifted so the top is 0
    other = "b" if chosen == "a" else "a"
    assert policy.state_dict()["log_weights"] == {chosen: 0.0, other: pytest.approx(-0.2)}
    p = policy.state_dict()["probabilities"]
    assert p[chosen] == pytest.approx(0.8 * math.exp(0.2) / (1 + math.exp(0.2)) + 0.1)
    assert sum(p.values()) == pytest.approx(1.0)
    # feedback for a query the policy did not choose (no notes) changes nothing
    before = policy.state_dict()
    policy.observe(query(9), feedback({"a": 1.0}))
    assert policy.state_dict() == before


def test_exp3_keeps_weights_finite() -> None:
    policy = Exp3Policy(["a", "b"], gamma=1.0, seed=0)
    for i in range(5000):
        q = query(i)
        chosen = only(policy.select(q))
        policy.observe(q, feedback({chosen: 1.0 if chosen == "a" else 0.0}))
    state = policy.state_dict()
    assert all(math.isfinite(w) for w in state["log_weights"].values())
    assert max(state["log_weights"].values()) == 0.0


@pytest.mark.parametrize("name", list(BANDITS))
def test_bandits_ignore_feedback_for_other_models(name: str) -> None:
    policy = BANDITS[name](0)
    before = policy.state_dict()
    q = query()
    policy.select(q)
    policy.observe(q, feedback({"retired": 1.0}))
    policy.observe(q, feedback({"good": math.nan}))
    assert policy.state_dict() == before


# --- exp4 --------------------------------------------------------------------------------------


def test_exp4_moves_weight_to_the_more_accurate_model() -> None:
    policy = Exp4Policy(["a", "b"])
    assert list(policy.select(query())) == ["a", "b"]
    environment = random.Random(5)
    for i in range(200):
        q = query(i)
        label = environment.choice(["cat", "dog"])
        wrong = "dog" if label == "cat" else "cat"
        predictions = {
            "a": label if environment.random() < 0.9 else wrong,
            "b": label if environment.random() < 0.5 else wrong,
        }
        output = combined(policy.combine(q, predictions)).output
        rewards = {m: ketch_reward_of("app", m, p, label) for m, p in predictions.items()}
        policy.observe(
            q,
            Feedback(
                reward=rewards["a"] if output == predictions["a"] else rewards["b"],
                label=label,
                output=output,
                predictions=predictions,
                rewards=rewards,
            ),
        )
    weights = policy.state_dict()["weights"]
    assert weights["a"] > 0.9
    assert sum(weights.values()) == pytest.approx(1.0)
    # the vote now follows a even when b disagrees
    assert combined(policy.combine(query(), {"a": "cat", "b": "dog"})).output == "cat"


def test_exp4_combines_with_learnt_weights() -> None:
    policy = Exp4Policy(["a", "b"], eta=1.0)
    policy.observe(query(), feedback({"a": 1.0, "b": 0.0}))
    assert policy.state_dict()["log_weights"] == {"a": 0.0, "b": -1.0}
    share = math.e / (math.e + 1)
    result = combined(policy.combine(query(), {"a": 1.0, "b": 0.0}))
    assert result.output == pytest.approx(share)
    assert result.confidence == pytest.approx(1 / (1 + math.sqrt(share * (1 - share))))
    # only b answered: its weight is renormalised to 1
    assert combined(policy.combine(query(), {"b": 0.3})).output == pytest.approx(0.3)


def test_exp4_only_b_answering_after_a_long_run() -> None:
    policy = Exp4Policy(["a", "b"], eta=5.0)
    for _ in range(1000):
        policy.observe(query(), feedback({"a": 1.0, "b": 0.0}))
    assert policy.state_dict()["weights"]["b"] == 0.0  # underflowed
    result = combined(policy.combine(query(), {"b": "dog"}))
    assert result.output == "dog"
    assert result.confidence == 1.0
