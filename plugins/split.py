"""The ``split`` policy: a weighted traffic split, for A/B tests and canary releases.

Each query goes to one model drawn at random in proportion to its weight: ``weights = {"v1":
95, "v2": 5}`` sends about 5% of traffic to a canary. Compare the models with the per-model
rewards feedback reports; the policy itself does not learn from them (a bandit policy does).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

import msgspec

from ketch.hookspecs import RegisterPolicy, hookimpl
from ketch.plugins._common import check_weights, read_numbers
from ketch.plugins.params import PolicyParams, Seed, Weights, parsed
from ketch.policy import Policy, Query


class SplitParams(PolicyParams, frozen=True):
    """``split``'s parameters."""

    weights: Annotated[
        Weights,
        msgspec.Meta(
            description="each model's share of the traffic, with a positive total; models it "
            "does not list get none. None splits equally"
        ),
    ] = None
    seed: Seed = None


class SplitPolicy(Policy):
    """Sends each query to one model, drawn at random by weight.

    :param models: the models to split traffic between.
    :param params: :class:`SplitParams`.
    """

    Params: ClassVar[type[PolicyParams]] = SplitParams

    def __init__(self, models: Sequence[str], **params: Any) -> None:
        super().__init__(models)
        given = parsed(SplitParams, params)
        self.weights = check_weights(self.models, given.weights)
        self._rng = random.Random(given.seed)
        # Models with no weight are left out so that a draw never lands on them.
        self._choices = [m for m in self.models if self.weights[m] > 0]
        self._cum_weights = list(itertools.accumulate(self.weights[m] for m in self._choices))
        self._routed = dict.fromkeys(self.models, 0)

    def select(self, query: Query) -> Sequence[str]:
        model = self._rng.choices(self._choices, cum_weights=self._cum_weights)[0]
        self._routed[model] += 1
        return (model,)

    def state_dict(self) -> dict[str, Any]:
        return {"routed": dict(self._routed)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        routed = read_numbers(state, "routed", self.models, minimum=0)
        self._routed = {m: int(routed.get(m, 0)) for m in self.models}


@hookimpl
def ketch_register_policies(register: RegisterPolicy) -> None:
    register("split", SplitPolicy)
