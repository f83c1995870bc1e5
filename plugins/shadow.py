"""The ``shadow`` policy: serve one model and mirror its traffic to others, to compare them.

Use it to try a new model version on real traffic before it answers anyone: clients only ever
get the primary model's answer, while the shadow models get the same queries and
:meth:`ShadowPolicy.state_dict` reports how often each agreed with the primary and, for numeric
answers, by how much they differ. Mirrored queries cost the shadow models' capacity, not the
client's latency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

import msgspec

from ketch.hookspecs import RegisterPolicy, hookimpl
from ketch.plugins._common import check_number, is_finite_real, is_real, section
from ketch.plugins.params import PolicyParams, parsed
from ketch.policy import Combined, Policy, Query, confidence_of


class ShadowParams(PolicyParams, frozen=True):
    """``shadow``'s parameters."""

    primary: Annotated[
        str | None,
        msgspec.Meta(description="the model that answers; None: the first model listed"),
    ] = None
    tolerance: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            description="the largest absolute difference at which two numbers (or two lists "
            "of numbers, element by element) still agree; other answers agree when equal",
        ),
    ] = 1e-9


class ShadowPolicy(Policy):
    """Answers with the primary model; the other models are mirrored and compared with it.

    :param models: the primary and the shadow models.
    :param params: :class:`ShadowParams`.
    """

    Params: ClassVar[type[PolicyParams]] = ShadowParams

    def __init__(self, models: Sequence[str], **params: Any) -> None:
        super().__init__(models)
        given = parsed(ShadowParams, params)
        primary = given.primary
        if primary is None:
            primary = self.models[0]
        if primary not in self.models:
            raise ValueError(
                f"primary must be one of the models {list(self.models)!r}, not {primary!r}"
            )
        self.primary: str = primary
        self.tolerance = given.tolerance
        self.shadows = tuple(m for m in self.models if m != primary)
        self._compared = dict.fromkeys(self.shadows, 0)
        self._agreed = dict.fromkeys(self.shadows, 0)
        # The mean absolute difference only covers the comparisons where both were numeric.
        self._numeric = dict.fromkeys(self.shadows, 0)
        self._mean_abs_diff = dict.fromkeys(self.shadows, 0.0)

    def select(self, query: Query) -> Sequence[str]:
        return (self.primary,)

    def mirror(self, query: Query) -> Sequence[str]:
        return self.shadows

    def combine(self, query: Query, predictions: Mapping[str, Any]) -> Combined:
        if self.primary in predictions:
            prediction = predictions[self.primary]
        else:
            prediction = next(iter(predictions.values()))
        return Combined(prediction, confidence_of(prediction))

    def compare(self, query: Query, served: Mapping[str, Any], mirrored: Mapping[str, Any]) -> None:
        if self.primary not in served:
            # The primary missed its deadline: there is nothing to compare the shadows with.
            return
        reference = served[self.primary]
        for model, prediction in mirrored.items():
            if model not in self._compared:
                continue
            self._compared[model] += 1
            if self._agree(reference, prediction):
                self._agreed[model] += 1
            diff = _abs_diff(reference, prediction)
            if diff is not None:
                self._numeric[model] += 1
                count = self._numeric[model]
                self._mean_abs_diff[model] += (diff - self._mean_abs_diff[model]) / count

    def _agree(self, a: Any, b: Any) -> bool:
        if is_real(a) and is_real(b):
            return bool(a == b or abs(a - b) <= self.tolerance)
        if _is_number_list(a) and _is_number_list(b):
            return len(a) == len(b) and all(
                x == y or abs(x - y) <= self.tolerance for x, y in zip(a, b, strict=True)
            )
        try:
            return bool(a == b)
        except Exception:
            # An ``==`` that is not a bool (numpy arrays): such answers are not comparable.
            return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "shadows": {
                m: {
                    "compared": self._compared[m],
                    "agreed": self._agreed[m],
                    "agreement": (
                        self._agreed[m] / self._compared[m] if self._compared[m] else None
                    ),
                    "mean_abs_diff": self._mean_abs_diff[m] if self._numeric[m] else None,
                    # Needed to go on averaging after a restart.
                    "numeric_compared": self._numeric[m],
                }
                for m in self.shadows
            }
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shadows = section(state, "shadows")
        restored = {m: _read_shadow(m, shadows[m]) for m in self.shadows if m in shadows}
        for model, (compared, agreed, numeric, mean_abs_diff) in restored.items():
            self._compared[model] = compared
            self._agreed[model] = agreed
            self._numeric[model] = numeric
            self._mean_abs_diff[model] = mean_abs_diff


def _read_shadow(model: str, entry: Any) -> tuple[int, int, int, float]:
    where = f"state['shadows'][{model!r}]"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a mapping, not {entry!r}")
    compared = int(check_number(f"{where}['compared']", entry.get("compared", 0), minimum=0))
    agreed = int(check_number(f"{where}['agreed']", entry.get("agreed", 0), minimum=0))
    mean = entry.get("mean_abs_diff")
    if mean is None:
        return compared, min(agreed, compared), 0, 0.0
    # States without the count predate it: assume every comparison was numeric.
    numeric = entry.get("numeric_compared", compared)
    return (
        compared,
        min(agreed, compared),
        int(check_number(f"{where}['numeric_compared']", numeric, minimum=0)),
        check_number(f"{where}['mean_abs_diff']", mean, minimum=0.0),
    )


def _is_number_list(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str | bytes | bytearray)
        and all(is_real(x) for x in value)
    )


def _abs_diff(a: Any, b: Any) -> float | None:
    """How far apart two numeric answers are (the mean over elements for lists), or ``None``
    when they are not both finite numbers or lists of them of one length."""
    if is_finite_real(a) and is_finite_real(b):
        return abs(float(a) - float(b))
    if (
        _is_number_list(a)
        and _is_number_list(b)
        and len(a) == len(b) > 0
        and all(is_finite_real(x) for x in a)
        and all(is_finite_real(x) for x in b)
    ):
        return math.fsum(abs(float(x) - float(y)) for x, y in zip(a, b, strict=True)) / len(a)
    return None


@hookimpl
def ketch_register_policies(register: RegisterPolicy) -> None:
    register("shadow", ShadowPolicy)
