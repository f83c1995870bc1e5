"""Multi-armed bandit policies: send each query to one model and learn which earns most reward.

Use them to pick the best of several models on live traffic when the best is not known in
advance, or changes: each query goes to one model, feedback rewards it, and traffic drifts to
the models with the highest rewards while still trying the others now and then. They need
feedback (a reward, or a label that ``ketch_reward_of`` scores) to learn anything.

- ``epsilon_greedy``: the best model so far, except for a fixed share of random tries. Simple
  and predictable; it never stops exploring.
- ``ucb1``: deterministic optimism (the best upper confidence bound); explores less and less.
- ``thompson``: Thompson sampling with Beta posteriors; usually the fastest to settle.
- ``exp3``: for adversarial or drifting rewards; learns from importance-weighted rewards and
  keeps a floor of exploration.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

import msgspec

from ketch.hookspecs import RegisterPolicy, hookimpl
from ketch.plugins._common import clean_reward, read_log_weights, read_numbers
from ketch.plugins.params import PolicyParams, Seed, parsed
from ketch.policy import Feedback, Policy, Query


class EpsilonGreedyParams(PolicyParams, frozen=True):
    """``epsilon_greedy``'s parameters."""

    epsilon: Annotated[
        float, msgspec.Meta(ge=0, le=1, description="the share of queries sent to a random model")
    ] = 0.1
    seed: Seed = None


class UCB1Params(PolicyParams, frozen=True):
    """``ucb1`` takes no parameter: it is deterministic."""


class ThompsonParams(PolicyParams, frozen=True):
    """``thompson``'s parameters."""

    seed: Seed = None


class Exp3Params(PolicyParams, frozen=True):
    """``exp3``'s parameters."""

    gamma: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            le=1,
            description="exploration rate: every model keeps at least gamma / K of the traffic",
        ),
    ] = 0.1
    seed: Seed = None


class _MeanRewardPolicy(Policy):
    """A bandit that keeps each model's number of rewards and their running mean."""

    def __init__(self, models: Sequence[str]) -> None:
        super().__init__(models)
        self._pulls = dict.fromkeys(self.models, 0)
        self._means = dict.fromkeys(self.models, 0.0)
        self._total_pulls = 0

    def observe(self, query: Query, feedback: Feedback) -> None:
        for model, value in feedback.rewards.items():
            reward = clean_reward(value)
            if reward is None or model not in self._pulls:
                continue
            self._pulls[model] += 1
            self._total_pulls += 1
            self._means[model] += (reward - self._means[model]) / self._pulls[model]

    def state_dict(self) -> dict[str, Any]:
        """How many rewards each model got (``pulls``) and their mean (``mean_reward``)."""
        return {"pulls": dict(self._pulls), "mean_reward": dict(self._means)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pulls = read_numbers(state, "pulls", self.models, minimum=0)
        means = read_numbers(state, "mean_reward", self.models, minimum=0.0, maximum=1.0)
        self._pulls = {m: int(pulls.get(m, 0)) for m in self.models}
        # A mean without pulls carries no information: the model starts fresh.
        self._means = {m: means.get(m, 0.0) if self._pulls[m] else 0.0 for m in self.models}
        self._total_pulls = sum(self._pulls.values())


class EpsilonGreedyPolicy(_MeanRewardPolicy):
    """Sends each query to the model with the best mean reward, or with probability
    ``epsilon`` to a model drawn uniformly. Models without a reward yet come first; ties are
    drawn at random.

    :param models: the models to choose from.
    :param params: :class:`EpsilonGreedyParams`.
    """

    Params: ClassVar[type[PolicyParams]] = EpsilonGreedyParams

    def __init__(self, models: Sequence[str], **params: Any) -> None:
        super().__init__(models)
        given = parsed(EpsilonGreedyParams, params)
        self.epsilon = given.epsilon
        self._rng = random.Random(given.seed)

    def select(self, query: Query) -> Sequence[str]:
        if self._rng.random() < self.epsilon:
            return (self._rng.choice(self.models),)
        untried = [m for m in self.models if not self._pulls[m]]
        if untried:
            return (self._rng.choice(untried),)
        best = max(self._means.values())
        return (self._rng.choice([m for m in self.models if self._means[m] == best]),)


class UCB1Policy(_MeanRewardPolicy):
    """Sends each query to the model with the highest upper confidence bound on its mean
    reward, ``mean + sqrt(2 ln N / n)`` (``n`` its rewards, ``N`` all rewards); models without a
    reward yet go first, in the application's order. Deterministic: ties go to the model
    listed first.

    Until a model's first reward arrives, it keeps getting the queries: with slow feedback
    the first models get bursts of traffic.

    :param models: the models to choose from.
    :param params: :class:`UCB1Params` (none).
    """

    Params: ClassVar[type[PolicyParams]] = UCB1Params

    def __init__(self, models: Sequence[str], **params: Any) -> None:
        super().__init__(models)
        parsed(UCB1Params, params)

    def select(self, query: Query) -> Sequence[str]:
        for model in self.models:
            if not self._pulls[model]:
                return (model,)
        log_total = 2.0 * math.log(self._total_pulls)
        best = max(
            self.models,
            key=lambda m: self._means[m] + math.sqrt(log_total / self._pulls[m]),
        )
        return (best,)


class ThompsonPolicy(Policy):
    """Thompson sampling: each model's reward rate has a ``Beta(1 + successes, 1 +
    failures)`` posterior; each query goes to the model whose sampled rate is highest. A
    reward ``r`` in ``[0, 1]`` adds ``r`` to successes and ``1 - r`` to failures, so partial
    rewards count partially.

    :param models: the models to choose from.
    :param params: :class:`ThompsonParams`.
    """

    Params: ClassVar[type[PolicyParams]] = ThompsonParams

    def __init__(self, models: Sequence[str], **params: Any) -> None:
        super().__init__(models)
        self._rng = random.Random(parsed(ThompsonParams, params).seed)
        self._successes = dict.fromkeys(self.models, 0.0)
        self._failures = dict.fromkeys(self.models, 0.0)

    def select(self, query: Query) -> Sequence[str]:
        beta = self._rng.betavariate
        best = max(
            self.models,
            key=lambda m: beta(1.0 + self._successes[m], 1.0 + self._failures[m]),
        )
        return (best,)

    def observe(self, query: Query, feedback: Feedback) -> None:
        for model, value in feedback.rewards.items():
            reward = clean_reward(value)
            if reward is None or model not in self._successes:
                continue
            self._successes[model] += reward
            self._failures[model] += 1.0 - reward

    def state_dict(self) -> dict[str, Any]:
        return {"successes": dict(self._successes), "failures": dict(self._failures)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        successes = read_numbers(state, "successes", self.models, minimum=0.0)
        failures = read_numbers(state, "failures", self.models, minimum=0.0)
        self._successes = {m: successes.get(m, 0.0) for m in self.models}
        self._failures = {m: failures.get(m, 0.0) for m in self.models}


class Exp3Policy(Policy):
    """Exp3 (exponential weights for exploration and exploitation): each query goes to a model
    drawn with probability ``p_i = (1 - gamma) w_i / sum(w) + gamma / K``; the chosen model's
    reward ``r`` is divided by ``p_i`` (so rarely chosen models are not underrated) and raises
    its log-weight by ``gamma * r / (p_i K)``. Makes no assumption that rewards are stationary.

    ``gamma`` trades exploration against speed: every model keeps at least ``gamma / K`` of the
    traffic, and weights grow by about ``gamma / K`` times the reward gap per query. The
    default ``0.1`` settles within a few hundred rewards on two models whose rewards differ by
    0.4, while the worse one keeps about 5% of the traffic.

    :param models: the models to choose from.
    :param params: :class:`Exp3Params`.
    """

    Params: ClassVar[type[PolicyParams]] = Exp3Params

    def __init__(self, models: Sequence[str], **params: Any) -> None:
        super().__init__(models)
        given = parsed(Exp3Params, params)
        self.gamma = given.gamma
        self._rng = random.Random(given.seed)
        self._log_weights = dict.fromkeys(self.models, 0.0)
        self._probabilities = self._compute_probabilities()

    def _compute_probabilities(self) -> list[float]:
        top = max(self._log_weights.values())
        weights = [math.exp(self._log_weights[m] - top) for m in self.models]
        total = math.fsum(weights)
        floor = self.gamma / len(self.models)
        return [(1.0 - self.gamma) * w / total + floor for w in weights]

    def select(self, query: Query) -> Sequence[str]:
        index = self._rng.choices(range(len(self.models)), weights=self._probabilities)[0]
        model = self.models[index]
        # Feedback needs the probability of this very draw; the weights may move meanwhile.
        query.notes["exp3_p"] = self._probabilities[index]
        query.notes["exp3_model"] = model
        return (model,)

    def observe(self, query: Query, feedback: Feedback) -> None:
        model = query.notes.get("exp3_model")
        p = query.notes.get("exp3_p")
        if not isinstance(model, str) or model not in self._log_weights:
            return
        if not isinstance(p, float) or not 0.0 < p <= 1.0:
            return
        reward = clean_reward(feedback.rewards.get(model))
        if reward is None:
            return
        self._log_weights[model] += self.gamma * (reward / p) / len(self.models)
        self._normalise()

    def _normalise(self) -> None:
        # Only differences matter; keeping the top at 0 keeps exp() from overflowing.
        top = max(self._log_weights.values())
        self._log_weights = {m: w - top for m, w in self._log_weights.items()}
        self._probabilities = self._compute_probabilities()

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_weights": dict(self._log_weights),
            "probabilities": dict(zip(self.models, self._probabilities, strict=True)),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._log_weights = read_log_weights(state, self.models)
        self._normalise()


@hookimpl
def ketch_register_policies(register: RegisterPolicy) -> None:
    register("epsilon_greedy", EpsilonGreedyPolicy)
    register("ucb1", UCB1Policy)
    register("thompson", ThompsonPolicy)
    register("exp3", Exp3Policy)
