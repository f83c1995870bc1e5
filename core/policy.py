"""The selection-policy contract: how an application picks, combines and learns from models.

A policy follows Clipper's select / combine / observe loop. For every query the gateway asks
:meth:`Policy.select` which models to ask, sends the query to them, gives whatever answered by
the application's deadline to :meth:`Policy.combine`, and returns that. When feedback arrives
for the query (a reward, or the true label), :meth:`Policy.observe` learns from it. Two
optional steps extend the loop: :meth:`Policy.escalate` asks more models once the first ones
answered (cascades), and :meth:`Policy.mirror` sends a query to models whose answers are only
compared, never returned (shadow deployments).

A policy instance belongs to one application and runs in the gateway's event loop: its methods
must be quick and must not block. Its learnt state is what :meth:`Policy.state_dict` returns
(JSON-serialisable); the gateway saves it and hands it back through
:meth:`Policy.load_state_dict` after a restart.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Query:
    """One request to an application.

    :param id: the ``query_id`` the client got back, and names in its feedback.
    :param app: the application's name.
    :param input: the request's ``input``, as parsed from JSON.
    :param notes: the policy's own scratch space for this query, kept with it until its
        feedback (e.g. the probability with which :meth:`Policy.select` chose a model).
        It must stay small; the gateway keeps the last queries of each application.
    """

    id: str
    app: str
    input: Any
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Feedback:
    """What came back about a query, with the rewards worked out for each model.

    :param reward: reward of the answer the client got, in ``[0, 1]``: the one the client
        sent, else the label's reward for the output.
    :param label: the true answer when the client sent one, else ``None``.
    :param output: what the application answered.
    :param predictions: every model's answer to the query that reached the gateway, by model
        (those combined into the output, mirrored ones, and stragglers that came late).
    :param rewards: reward of each model, in ``[0, 1]``. With a label, every model in
        ``predictions`` gets the reward of its own prediction (see the ``ketch_reward_of``
        hook); with only a reward, the models whose answers made the output share it.
    """

    reward: float
    label: Any
    output: Any
    predictions: Mapping[str, Any]
    rewards: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Combined:
    """An output, how sure the policy is of it (``None``: it cannot tell), and the models
    whose predictions made it (``None``: every prediction :meth:`Policy.combine` got). The
    answer's ``models`` are those, and a reward without a label goes to them alone: a cascade
    that answers with its last stage names that stage, not the ones it went past."""

    output: Any
    confidence: float | None = None
    models: Sequence[str] | None = None


class Policy:
    """Base class of selection policies; subclass it and register it from a plugin.

    The constructor receives the application's model names (in the order the application
    lists them) and the application's ``params`` as keyword arguments; it should raise
    ``TypeError`` or ``ValueError`` naming a parameter that is wrong, which the gateway reports
    when it starts. The defaults below make a policy that asks every model and answers with
    the first one (in the application's order) that answered.
    """

    def __init__(self, models: Sequence[str]) -> None:
        if not models:
            raise ValueError("a policy needs at least one model")
        self.models: tuple[str, ...] = tuple(models)

    def select(self, query: Query) -> Sequence[str]:
        """The models whose answers :meth:`combine` gets, a non-empty subset of
        :attr:`models`."""
        return self.models

    def escalate(self, query: Query, predictions: Mapping[str, Any]) -> Sequence[str]:
        """More models to ask now that ``predictions`` (the answers so far) are in; empty to
        answer with what is there. Called again after each round, within the deadline."""
        return ()

    def mirror(self, query: Query) -> Sequence[str]:
        """Models that also get the query, whose answers go to :meth:`compare` only."""
        return ()

    def combine(self, query: Query, predictions: Mapping[str, Any]) -> Combined | Any:
        """The application's output from the ``predictions`` that arrived by the deadline
        (never empty: with no prediction the application answers its ``default_output``).
        Return a :class:`Combined` to report a confidence, or the output itself."""
        first = next(name for name in self.models if name in predictions)
        return Combined(predictions[first], confidence_of(predictions[first]), (first,))

    def compare(self, query: Query, served: Mapping[str, Any], mirrored: Mapping[str, Any]) -> None:
        """Called once the mirrored models answered (or gave up), with what the served ones
        answered; for shadow deployments."""

    def observe(self, query: Query, feedback: Feedback) -> None:
        """Learn from the feedback to a query this policy answered."""

    def state_dict(self) -> dict[str, Any]:
        """The policy's learnt state, JSON-serialisable; also shown by ``GET /apps``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (after a gateway restart)."""


def confidence_of(prediction: Any) -> float | None:
    """How sure a model is of ``prediction``, in ``[0, 1]``, or ``None`` when it cannot tell.

    - a mapping with a ``"confidence"`` number: that number;
    - a probability (a number in ``[0, 1]``): its distance from a coin toss, ``max(p, 1 - p)``;
    - a list of class probabilities: the largest.
    """
    if isinstance(prediction, Mapping):
        value = prediction.get("confidence")
        return _unit_number(value)
    if _is_real(prediction):
        p = _unit_number(prediction)
        return None if p is None else max(p, 1.0 - p)
    if isinstance(prediction, Sequence) and not isinstance(prediction, str) and prediction:
        values = [_unit_number(v) for v in prediction]
        if all(v is not None for v in values):
            return max(v for v in values if v is not None)
    return None


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _unit_number(value: Any) -> float | None:
    if not _is_real(value):
        return None
    number = float(value)
    return number if math.isfinite(number) and 0.0 <= number <= 1.0 else None
