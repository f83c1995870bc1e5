"""Unit tests of the built-in selection policies (``ketch.plugins``): pure Python, no processes."""

from __future__ import annotations

import importlib
import math
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import orjson
import pluggy
import pytest

import ketch.hookspecs
from ketch.plugins import BUILTIN_PLUGINS
from ketch.plugins.bandits import EpsilonGreedyPolicy, Exp3Policy, ThompsonPolicy, UCB1Policy
from ketch.plugins.cascade import CascadePolicy
from ketch.plugins.ensemble import EnsemblePolicy
from ketch.plugins.exp4 import Exp4Policy
from ketch.plugins.rewards import ketch_reward_of
from ketch.plugins.shadow import ShadowPolicy
from ketch.plugins.single import SinglePolicy
from ketch.plugins.split import SplitPolicy
from ketch.policy import Combined, Feedback, Policy, Query

NAMES = (
    "single",
    "split",
    "shadow",
    "ensemble",
    "cascade",
    "epsilon_greedy",
    "ucb1",
    "thompson",
    "exp3",
    "exp4",
)


def query(n: int = 0) -> Query:
    return Query(id=str(n), app="app", input=None)


def feedback(rewards: Mapping[str, float]) -> Feedback:
    """Feedback with a reward for each of ``rewards``' models, as for a bare reward."""
    return Feedback(
        reward=max(rewards.values()),
        label=None,
        output="x",
        predictions=dict.fromkeys(rewards, "x"),
        rewards=rewards,
    )


def only(selected: Any) -> str:
    models: list[str] = list(selected)
    assert len(models) == 1, models
    return models[0]


def combined(result: Any) -> Combined:
    assert isinstance(result, Combined)
    return result


def json_round_trip(state: dict[str, Any]) -> dict[str, Any]:
    loaded = orjson.loads(orjson.dumps(state))
    assert isinstance(loaded, dict)
    return loaded


# --- hooks --------------------------------------------------------------------------------------


def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("ketch")
    pm.add_hookspecs(ketch.hookspecs)
    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    return pm


def test_builtin_plugins_register_each_policy_once() -> None:
    registered: list[tuple[str, type[Policy]]] = []
    plugin_manager().hook.ketch_register_policies(
        register=lambda name, cls: registered.append((name, cls))
    )
    names = [name for name, _ in registered]
    assert sorted(names) == sorted(NAMES)
    assert all(issubclass(cls, Policy) for _, cls in registered)


def test_builtin_reward_through_the_hook() -> None:
    hook = plugin_manager().hook
    assert hook.ketch_reward_of(app="a", model="m", prediction=0.75, label=1) == 0.75
    assert hook.ketch_reward_of(app="a", model="m", prediction="cat", label="dog") == 0.0


@pytest.mark.parametrize(
    ("prediction", "label", "reward"),
    [
        (0.75, 1, 0.75),
        (3, 1, 0.0),
        (-0.5, -0.25, 0.75),
        ("cat", "cat", 1.0),
        ([1, 2], [1, 2], 1.0),
        ({"a": 1}, {"a": 2}, 0.0),
        (True, True, 1.0),
        (0.5, True, 0.0),  # a bool label is a class, not the number 1
        (float("nan"), 1.0, 0.0),
        (None, None, 1.0),
    ],
)
def test_builtin_reward(prediction: Any, label: Any, reward: float) -> None:
    value = ketch_reward_of(app="a", model="m", prediction=prediction, label=label)
    assert type(value) is float
    assert value == pytest.approx(reward)


def test_builtin_reward_of_an_array_prediction() -> None:
    assert ketch_reward_of(app="a", model="m", prediction=np.array([1, 2]), label=[1, 2]) == 1.0
    assert ketch_reward_of(app="a", model="m", prediction=np.array([1, 2]), label=[1, 3]) == 0.0


# --- parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "models", "params", "error", "named"),
    [
        (SinglePolicy, ["a", "b"], {}, ValueError, "policy"),
        (SplitPolicy, ["a", "b"], {"weights": {"a": 1, "c": 1}}, ValueError, "weights names"),
        (SplitPolicy, ["a", "b"], {"weights": {"a": -1, "b": 2}}, ValueError, "weights={'a': -1"),
        (SplitPolicy, ["a", "b"], {"weights": {"a": math.inf}}, ValueError, "weights['a']"),
        (SplitPolicy, ["a", "b"], {"weights": {"a": 0, "b": 0}}, ValueError, "weights"),
        (SplitPolicy, ["a", "b"], {"weights": {"a": "1"}}, TypeError, "weights={'a': '1'}"),
        (SplitPolicy, ["a", "b"], {"weights": [1, 2]}, TypeError, "weights=[1, 2]"),
        (SplitPolicy, ["a", "b"], {"seed": "x"}, TypeError, "seed='x'"),
        (ShadowPolicy, ["a", "b"], {"primary": "c"}, ValueError, "primary"),
        (ShadowPolicy, ["a", "b"], {"tolerance": -1}, ValueError, "tolerance=-1"),
        (EnsemblePolicy, ["a", "b"], {"method": "median"}, ValueError, "method='median'"),
        (EnsemblePolicy, ["a", "b"], {"weights": {"z": 1}}, ValueError, "weights names"),
        (CascadePolicy, ["a", "b"], {"threshold": 0}, ValueError, "threshold=0"),
        (CascadePolicy, ["a", "b"], {"threshold": 1.5}, ValueError, "threshold=1.5"),
        (CascadePolicy, ["a", "b"], {"threshold": True}, TypeError, "threshold=True"),
        (EpsilonGreedyPolicy, ["a", "b"], {"epsilon": 1.1}, ValueError, "epsilon=1.1"),
        (EpsilonGreedyPolicy, ["a", "b"], {"epsilon": math.nan}, ValueError, "epsilon=nan"),
        (ThompsonPolicy, ["a", "b"], {"seed": 1.5}, TypeError, "seed=1.5"),
        (Exp3Policy, ["a", "b"], {"gamma": 0}, ValueError, "gamma=0"),
        (Exp4Policy, ["a", "b"], {"eta": 0}, ValueError, "eta=0"),
        (Exp4Policy, ["a", "b"], {"eta": math.inf}, ValueError, "eta=inf"),
        (Exp4Policy, ["a", "b"], {"method": 3}, TypeError, "method=3"),
        (UCB1Policy, ["a", "b"], {"seed": 1}, TypeError, "seed=1"),
    ],
)
def test_invalid_params_name_the_parameter(
    cls: Callable[..., Policy],
    models: list[str],
    params: dict[str, Any],
    error: type[Exception],
    named: str,
) -> None:
    with pytest.raises(error) as info:
        cls(models, **params)
    assert named in str(info.value)


def test_unknown_param_is_a_type_error_naming_it_and_what_the_policy_takes() -> None:
    with pytest.raises(TypeError, match=r"gama=0\.1 \(this policy takes: gamma, seed\)"):
        Exp3Policy(["a", "b"], gama=0.1)


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


# --- state -------------------------------------------------------------------------------------

TRAINABLE: dict[str, Callable[[], Policy]] = {
    "single": lambda: SinglePolicy(["good"]),
    "split": lambda: SplitPolicy(["good", "bad"], seed=0),
    "shadow": lambda: ShadowPolicy(["good", "bad"]),
    "ensemble": lambda: EnsemblePolicy(["good", "bad"]),
    "cascade": lambda: CascadePolicy(["good", "bad"]),
    "epsilon_greedy": lambda: EpsilonGreedyPolicy(["good", "bad"], seed=0),
    "ucb1": lambda: UCB1Policy(["good", "bad"]),
    "thompson": lambda: ThompsonPolicy(["good", "bad"], seed=0),
    "exp3": lambda: Exp3Policy(["good", "bad"], seed=0),
    "exp4": lambda: Exp4Policy(["good", "bad"]),
}


def exercise(policy: Policy, rounds: int = 300) -> None:
    """Every step of the loop, with rewards that favour ``good``."""
    environment = random.Random(11)
    for i in range(rounds):
        q = query(i)
        selected = list(policy.select(q))
        predictions = {m: environment.random() for m in selected}
        escalated = list(policy.escalate(q, predictions))
        predictions.update({m: environment.random() for m in escalated})
        policy.compare(q, predictions, {m: environment.random() for m in policy.mirror(q)})
        output = combined(policy.combine(q, predictions)).output
        rewards = {m: 0.9 if m == "good" else 0.2 for m in predictions}
        policy.observe(q, Feedback(max(rewards.values()), None, output, predictions, rewards))


def test_trainable_covers_every_registered_policy() -> None:
    assert sorted(TRAINABLE) == sorted(NAMES)


@pytest.mark.parametrize("name", list(TRAINABLE))
def test_state_survives_json(name: str) -> None:
    trained = TRAINABLE[name]()
    exercise(trained)
    state = trained.state_dict()
    restored = TRAINABLE[name]()
    restored.load_state_dict(json_round_trip(state))
    assert restored.state_dict() == state
    assert json_round_trip(restored.state_dict()) == json_round_trip(state)


@pytest.mark.parametrize("name", ["single", "shadow", "ensemble", "cascade", "ucb1", "exp4"])
def test_deterministic_policies_select_the_same_after_restoring(name: str) -> None:
    trained = TRAINABLE[name]()
    exercise(trained)
    restored = TRAINABLE[name]()
    restored.load_state_dict(json_round_trip(trained.state_dict()))
    for i in range(20):
        assert list(trained.select(query(i))) == list(restored.select(query(i)))
    predictions = {"good": 0.3, "bad": 0.9}
    assert trained.combine(query(), predictions) == restored.combine(query(), predictions)


def test_random_policies_select_alike_after_restoring() -> None:
    trained = Exp3Policy(["good", "bad"], seed=0)
    exercise(trained)
    p = trained.state_dict()["probabilities"]
    restored = Exp3Policy(["good", "bad"], seed=1)
    restored.load_state_dict(json_round_trip(trained.state_dict()))
    picks = [only(restored.select(query(i))) for i in range(2000)]
    assert picks.count("good") / len(picks) == pytest.approx(p["good"], abs=0.03)


def model_entries(state: Mapping[str, Any], model: str) -> dict[str, Any]:
    """What a state says about one model (its value in every per-model mapping)."""
    entries = {}
    for key, value in state.items():
        if isinstance(value, Mapping) and model in value:
            entries[key] = value[model]
    return entries


@pytest.mark.parametrize("name", [n for n in TRAINABLE if n != "single"])
def test_state_of_other_models_is_ignored_and_new_models_start_fresh(name: str) -> None:
    trained = TRAINABLE[name]()
    exercise(trained)
    restored = type(trained)(["good", "new"])
    restored.load_state_dict(json_round_trip(trained.state_dict()))
    state = restored.state_dict()
    assert "'bad'" not in repr(state)
    if name in ("exp3", "exp4"):
        # weights are relative: the new model starts level with the best, as all did at first
        assert state["log_weights"] == {"good": 0.0, "new": 0.0}
    else:
        fresh = type(trained)(["good", "new"]).state_dict()
        assert model_entries(state, "new") == model_entries(fresh, "new")
        assert model_entries(state, "good") == model_entries(trained.state_dict(), "good")


def test_load_state_rejects_nonsense_naming_the_entry() -> None:
    policy = UCB1Policy(["a", "b"])
    with pytest.raises(ValueError, match=r"state\['pulls'\]\['a'\]"):
        policy.load_state_dict({"pulls": {"a": -3}})
    with pytest.raises(ValueError, match="mean_reward"):
        policy.load_state_dict({"mean_reward": [0.5]})
    policy.load_state_dict({})
    assert policy.state_dict() == {"pulls": {"a": 0, "b": 0}, "mean_reward": {"a": 0.0, "b": 0.0}}
