"""The ``cascade`` policy: ask the cheapest model first and a costlier one only when unsure.

List the models from cheapest to most expensive. A query goes to the first; when its answer's
confidence (see :func:`ketch.policy.confidence_of`) is below ``threshold``, or it cannot tell,
the next model is asked, and so on. Use it when a small model answers most queries well and a
big one is worth its cost only on the hard ones; the models must report a confidence (a
probability, class probabilities, or a mapping with a ``"confidence"``) for it to help.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

import msgspec

from ketch.hookspecs import RegisterPolicy, hookimpl
from ketch.plugins._common import check_number, read_numbers
from ketch.plugins.params import PolicyParams, parsed
from ketch.policy import Combined, Policy, Query, confidence_of

#: Query note: the index of the last stage asked, so a stage that gave no answer is not
#: asked again.
_ASKED = "cascade_asked"


class CascadeParams(PolicyParams, frozen=True):
    """``cascade``'s parameters."""

    threshold: Annotated[
        float,
        msgspec.Meta(gt=0, le=1, description="the confidence at which a stage's answer is final"),
    ] = 0.9


class CascadePolicy(Policy):
    """Asks one model at a time, cheapest first, until one is confident enough.

    A stage that gave no answer (it failed) counts as unsure: the next stage is asked if the
    deadline leaves time. The answer is the prediction of the costliest stage that answered.

    :param models: the models, cheapest first.
    :param params: :class:`CascadeParams`.
    """

    Params: ClassVar[type[PolicyParams]] = CascadeParams

    def __init__(self, models: Sequence[str], **params: Any) -> None:
        super().__init__(models)
        self.threshold = parsed(CascadeParams, params).threshold
        self._index = {m: i for i, m in enumerate(self.models)}
        self._answered_by = dict.fromkeys(self.models, 0)
        self._escalations = 0
        self._unknown_confidence = 0

    def select(self, query: Query) -> Sequence[str]:
        query.notes[_ASKED] = 0
        return self.models[:1]

    def escalate(self, query: Query, predictions: Mapping[str, Any]) -> Sequence[str]:
        latest = self._latest(predictions)
        noted = query.notes.get(_ASKED)
        asked = max(noted if isinstance(noted, int) else 0, -1 if latest is None else latest)
        if latest is not None:
            confidence = confidence_of(predictions[self.models[latest]])
            if confidence is None:
                self._unknown_confidence += 1
            elif confidence >= self.threshold:
                return ()
        following = asked + 1
        if following >= len(self.models):
            return ()
        query.notes[_ASKED] = following
        self._escalations += 1
        return (self.models[following],)

    def combine(self, query: Query, predictions: Mapping[str, Any]) -> Combined:
        latest = self._latest(predictions)
        if latest is None:
            # Only models the policy does not know answered; answer rather than fail.
            model = next(iter(predictions))
        else:
            model = self.models[latest]
            self._answered_by[model] += 1
        prediction = predictions[model]
        # The stage that answered made the output: the cheaper ones it went past did not.
        return Combined(prediction, confidence_of(prediction), (model,))

    def _latest(self, predictions: Mapping[str, Any]) -> int | None:
        """Index of the costliest stage that answered, ``None`` if none did."""
        stages = [self._index[m] for m in predictions if m in self._index]
        return max(stages) if stages else None

    def state_dict(self) -> dict[str, Any]:
        """How many answers each stage gave, how many times a query went on to a costlier
        stage, and how many answers had no confidence to judge them by."""
        return {
            "answered_by": dict(self._answered_by),
            "escalations": self._escalations,
            "unknown_confidence": self._unknown_confidence,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        answered_by = read_numbers(state, "answered_by", self.models, minimum=0)
        escalations = check_number("state['escalations']", state.get("escalations", 0), minimum=0)
        unknown = check_number(
            "state['unknown_confidence']", state.get("unknown_confidence", 0), minimum=0
        )
        self._answered_by = {m: int(answered_by.get(m, 0)) for m in self.models}
        self._escalations = int(escalations)
        self._unknown_confidence = int(unknown)


@hookimpl
def ketch_register_policies(register: RegisterPolicy) -> None:
    register("cascade", CascadePolicy)
