"""A ketch plugin with one selection policy, ``round_robin``: each query goes to the next model.

Use it to spread queries evenly over equivalent models (replicas trained with other seeds, the
same model on other hardware) and to compare them on equal traffic: ``GET /apps`` shows how
many queries each served and the mean reward each earned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ketch


class RoundRobinPolicy(ketch.Policy):
    """Ask the models in turn, in the application's order.

    :param start: index of the model that answers the first query (default 0).
    """

    def __init__(self, models: Sequence[str], *, start: int = 0) -> None:
        super().__init__(models)
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < len(models):
            raise ValueError(
                f"start must be an index of the models (0-{len(models) - 1}), got {start!r}"
            )
        self.next = start
        self.served = dict.fromkeys(self.models, 0)
        self.reward_sum = dict.fromkeys(self.models, 0.0)
        self.rewarded = dict.fromkeys(self.models, 0)

    def select(self, query: ketch.Query) -> Sequence[str]:
        model = self.models[self.next]
        self.next = (self.next + 1) % len(self.models)
        self.served[model] += 1
        return [model]

    def observe(self, query: ketch.Query, feedback: ketch.Feedback) -> None:
        for model, reward in feedback.rewards.items():
            if model in self.reward_sum:
                self.reward_sum[model] += reward
                self.rewarded[model] += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "next": self.next,
            "served": dict(self.served),
            "mean_reward": {
                m: self.reward_sum[m] / self.rewarded[m] if self.rewarded[m] else None
                for m in self.models
            },
            "rewarded": dict(self.rewarded),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.next = int(state.get("next", 0)) % len(self.models)
        for model in self.models:
            self.served[model] = int(state.get("served", {}).get(model, 0))
            count = int(state.get("rewarded", {}).get(model, 0))
            mean = state.get("mean_reward", {}).get(model)
            self.rewarded[model] = count
            self.reward_sum[model] = float(mean) * count if mean is not None else 0.0


@ketch.hookimpl
def ketch_register_policies(register: ketch.RegisterPolicy) -> None:
    register("round_robin", RoundRobinPolicy)
