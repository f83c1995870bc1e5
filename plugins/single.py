"""The ``single`` policy: an application that serves one model.

Use it when an application is a plain endpoint for one model, with nothing to choose between;
the answer carries the model's own confidence (see :func:`ketch.policy.confidence_of`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ketch.hookspecs import RegisterPolicy, hookimpl
from ketch.plugins.params import PolicyParams, parsed
from ketch.policy import Combined, Policy, Query, confidence_of


class SingleParams(PolicyParams, frozen=True):
    """``single`` takes no parameter."""


class SinglePolicy(Policy):
    """Asks its one model and answers with its prediction.

    :param models: exactly one model name.
    """

    Params: ClassVar[type[PolicyParams]] = SingleParams

    def __init__(self, models: Sequence[str], **params: Any) -> None:
        super().__init__(models)
        parsed(SingleParams, params)
        if len(self.models) != 1:
            raise ValueError(
                f"the single policy serves exactly one model, not {len(self.models)} "
                f"({list(self.models)!r}); use split, ensemble, cascade or a bandit policy "
                "for several"
            )
        self.model = self.models[0]

    def select(self, query: Query) -> Sequence[str]:
        return self.models

    def combine(self, query: Query, predictions: Mapping[str, Any]) -> Combined:
        prediction = predictions.get(self.model, next(iter(predictions.values())))
        return Combined(prediction, confidence_of(prediction))


@hookimpl
def ketch_register_policies(register: RegisterPolicy) -> None:
    register("single", SinglePolicy)
