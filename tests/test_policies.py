"""Unit tests of what every built-in selection policy (``ketch.plugins``) shares: pure Python.

Registration through the hooks, the built-in reward, the checks of their parameters, and their
state, which survives JSON. Each family's own behaviour is tested beside this file:
``test_policies_routing.py`` (single, split, shadow), ``test_policies_combining.py`` (ensemble,
cascade) and ``test_policies_bandits.py`` (the bandits and exp4).
"""

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
from ketch.policy import Feedback, Policy
from tests.policy_helpers import combined, only, query

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
