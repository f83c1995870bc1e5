"""The built-in reward of a prediction given the true label (the ``ketch_reward_of`` hook).

It is registered last, so a plugin that knows better (a task-specific loss, a tolerance, a
partial credit for ranked answers) answers first; this is what every other case falls back on.
"""

from __future__ import annotations

from typing import Any

from ketch.hookspecs import hookimpl
from ketch.plugins._common import is_finite_real, json_key


@hookimpl(trylast=True)
def ketch_reward_of(app: str, model: str, prediction: Any, label: Any) -> float:
    """``1 - min(1, |prediction - label|)`` when both are finite real numbers (bools are not
    numbers here: a bool label is a class), else 1.0 when they are equal and 0.0 when not."""
    if is_finite_real(prediction) and is_finite_real(label):
        return 1.0 - min(1.0, abs(float(prediction) - float(label)))
    return 1.0 if _equal(prediction, label) else 0.0


def _equal(prediction: Any, label: Any) -> bool:
    try:
        result = prediction == label
        if isinstance(result, bool):
            return result
    except Exception:
        # A prediction's odd __eq__ must not lose the feedback.
        pass
    # An ``==`` that is not a bool (a numpy array's is elementwise): compare as JSON.
    return json_key(prediction) == json_key(label)
