"""The ``ensemble`` policy: ask every model and combine their answers into one.

Use it when several models are better together than apart: a weighted mean for regressors and
class-probability vectors, a weighted majority vote for labels. Its confidence says how much
the models agree, so a low one flags inputs the models disagree on. Models that miss the
deadline are left out and the weights of those that answered renormalised, so one slow model
costs accuracy, not the answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

import msgspec

from ketch.hookspecs import RegisterPolicy, hookimpl
from ketch.plugins._common import check_number, check_weights, read_numbers, weighted_combine
from ketch.plugins.params import MethodParam, PolicyParams, Weights, parsed
from ketch.policy import Combined, Policy, Query


class EnsembleParams(PolicyParams, frozen=True):
    """``ensemble``'s parameters."""

    method: MethodParam = "auto"
    weights: Annotated[
        Weights,
        msgspec.Meta(
            description="each model's weight, with a positive total; models it does not list "
            "are not asked. None weighs every model equally"
        ),
    ] = None


class EnsemblePolicy(Policy):
    """Asks every model with a weight and combines what arrived.

    - ``mean``: the weighted mean (element by element for lists), a float or a list of
      floats; confidence ``1 / (1 + s)`` where ``s`` is the weighted population standard
      deviation of the predictions (for lists, its mean over the elements).
    - ``vote``: the prediction with the largest total weight, predictions being equal when
      their JSON forms are (so ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}`` are one answer);
      confidence is the winner's share of the weight of the models that answered. A tie goes
      to the answer of the model listed first by the application.

    With ``method="mean"``, predictions that are not numeric are voted on rather than failing
    the query.

    :param models: the models to ask.
    :param params: :class:`EnsembleParams`.
    """

    Params: ClassVar[type[PolicyParams]] = EnsembleParams

    def __init__(self, models: Sequence[str], **params: Any) -> None:
        super().__init__(models)
        given = parsed(EnsembleParams, params)
        self.method = given.method
        self.weights = check_weights(self.models, given.weights)
        self._asked = tuple(m for m in self.models if self.weights[m] > 0)
        self._answered = dict.fromkeys(self.models, 0)
        self._combined = 0

    def select(self, query: Query) -> Sequence[str]:
        return self._asked

    def combine(self, query: Query, predictions: Mapping[str, Any]) -> Combined:
        self._combined += 1
        for model in predictions:
            if model in self._answered:
                self._answered[model] += 1
        return weighted_combine(self.models, predictions, self.weights, self.method)

    def state_dict(self) -> dict[str, Any]:
        """How many queries were combined and how many of them each model answered in time."""
        return {"combined": self._combined, "answered": dict(self._answered)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        answered = read_numbers(state, "answered", self.models, minimum=0)
        combined = check_number("state['combined']", state.get("combined", 0), minimum=0)
        self._answered = {m: int(answered.get(m, 0)) for m in self.models}
        self._combined = int(combined)


@hookimpl
def ketch_register_policies(register: RegisterPolicy) -> None:
    register("ensemble", EnsemblePolicy)
