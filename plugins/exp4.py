"""The ``exp4`` policy: an ensemble that learns how much to trust each model (Clipper's Exp4).

Every query goes to every model, like ``ensemble``, but each model's weight in the mean or vote
follows its rewards: a model's log-weight grows by ``eta`` times each reward it earns, so the
models that are right more often come to dominate. Use it when several models are worth asking
on every query and you can send labels as feedback. Labels are what it learns from: with a
bare reward, every model that made the output shares it and the weights do not move apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

import msgspec

from ketch.hookspecs import RegisterPolicy, hookimpl
from ketch.plugins._common import clean_reward, read_log_weights, weighted_combine
from ketch.plugins.params import MethodParam, PolicyParams, parsed
from ketch.policy import Combined, Feedback, Policy, Query


class Exp4Params(PolicyParams, frozen=True):
    """``exp4``'s parameters."""

    eta: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="learning rate: how far a reward of 1 moves a model's log-weight; "
            "larger settles on the best models sooner, but lets a run of luck sway them more",
        ),
    ] = 0.5
    method: MethodParam = "auto"


class Exp4Policy(Policy):
    """Asks every model and combines their answers with learnt weights.

    The weights used for a query are ``exp(log_w)`` renormalised over the models that
    answered; the combination and its confidence are as in the ``ensemble`` policy.

    :param models: the models to ask.
    :param params: :class:`Exp4Params`.
    """

    Params: ClassVar[type[PolicyParams]] = Exp4Params

    def __init__(self, models: Sequence[str], **params: Any) -> None:
        super().__init__(models)
        given = parsed(Exp4Params, params)
        self.eta = given.eta
        self.method = given.method
        self._log_weights = dict.fromkeys(self.models, 0.0)

    def select(self, query: Query) -> Sequence[str]:
        return self.models

    def combine(self, query: Query, predictions: Mapping[str, Any]) -> Combined:
        answered = [m for m in self.models if m in predictions]
        # Relative to the best that answered, so a weight that underflowed elsewhere cannot
        # leave these with a total of 0.
        top = max((self._log_weights[m] for m in answered), default=0.0)
        weights = {m: math.exp(self._log_weights[m] - top) for m in answered}
        return weighted_combine(self.models, predictions, weights, self.method)

    def observe(self, query: Query, feedback: Feedback) -> None:
        changed = False
        for model, value in feedback.rewards.items():
            reward = clean_reward(value)
            if reward is None or model not in self._log_weights:
                continue
            self._log_weights[model] += self.eta * reward
            changed = True
        if changed:
            self._normalise()

    def _normalise(self) -> None:
        # Only differences matter; keeping the top at 0 keeps the numbers small.
        top = max(self._log_weights.values())
        self._log_weights = {m: w - top for m, w in self._log_weights.items()}

    def weights(self) -> dict[str, float]:
        """Each model's share of the weight, summing to 1."""
        exp = {m: math.exp(w) for m, w in self._log_weights.items()}
        total = math.fsum(exp.values())
        return {m: w / total for m, w in exp.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"log_weights": dict(self._log_weights), "weights": self.weights()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._log_weights = read_log_weights(state, self.models)
        self._normalise()


@hookimpl
def ketch_register_policies(register: RegisterPolicy) -> None:
    register("exp4", Exp4Policy)
