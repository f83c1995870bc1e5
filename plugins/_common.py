"""Helpers the built-in policies share: number and weight checks, rewards, weighted combining
and state restoring (their parameters' declarations are :mod:`ketch.plugins.params`). Internal
to :mod:`ketch.plugins`; plugin authors should not import it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import orjson

from ketch.policy import Combined

#: How an ensemble turns several predictions into one output.
Method = Literal["auto", "mean", "vote"]


def is_real(value: Any) -> bool:
    """A real number that is not a bool (``True`` is an ``int`` to Python, not to a user)."""
    kind = type(value)
    # The exact types first: the ABC check is slow on the long lists some models answer.
    if kind is float or kind is int:
        return True
    return isinstance(value, numbers.Real) and kind is not bool


def is_finite_real(value: Any) -> bool:
    if type(value) is float:
        return math.isfinite(value)
    if not is_real(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        # An int too large for a float.
        return False


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
) -> float:
    """``value`` as a float, or a ``TypeError``/``ValueError`` naming parameter ``name``."""
    if not is_real(value):
        raise TypeError(f"{name} must be a number, not {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    ok = math.isfinite(number)
    if minimum is not None:
        ok = ok and (number > minimum if min_open else number >= minimum)
    if maximum is not None:
        ok = ok and (number < maximum if max_open else number <= maximum)
    if not ok:
        raise ValueError(
            f"{name} must be {_interval(minimum, maximum, min_open, max_open)}, not {value!r}"
        )
    return number


def _interval(minimum: float | None, maximum: float | None, min_open: bool, max_open: bool) -> str:
    if minimum is not None and maximum is not None:
        low, high = "(" if min_open else "[", ")" if max_open else "]"
        return f"a number in {low}{minimum:g}, {maximum:g}{high}"
    if minimum is not None:
        return f"a finite number {'>' if min_open else '>='} {minimum:g}"
    if maximum is not None:
        return f"a finite number {'<' if max_open else '<='} {maximum:g}"
    return "a finite number"


def check_weights(models: Sequence[str], weights: Any, name: str = "weights") -> dict[str, float]:
    """Per-model weights from a ``{model: weight}`` parameter; ``None`` weighs all equally and
    models it does not list get 0."""
    if weights is None:
        return dict.fromkeys(models, 1.0)
    if not isinstance(weights, Mapping):
        raise TypeError(f"{name} must be a mapping of model name to weight, not {weights!r}")
    unknown = [key for key in weights if key not in models]
    if unknown:
        raise ValueError(
            f"{name} names models the application does not have: {unknown!r} "
            f"(its models are {list(models)!r})"
        )
    for key, value in weights.items():
        check_number(f"{name}[{key!r}]", value, minimum=0.0)
    total = math.fsum(float(v) for v in weights.values())
    if not (math.isfinite(total) and total > 0):
        raise ValueError(
            f"{name} must give some model a weight > 0, with a finite total, not {dict(weights)!r}"
        )
    return {m: float(weights.get(m, 0.0)) for m in models}


def clean_reward(value: Any) -> float | None:
    """A reward from :attr:`Feedback.rewards` clipped to ``[0, 1]``; ``None`` if it is not a
    finite number (a plugin's ``ketch_reward_of`` may be sloppy, the policies must not be)."""
    if not is_finite_real(value):
        return None
    return min(1.0, max(0.0, float(value)))


def json_key(value: Any) -> bytes:
    """``value``'s JSON form with sorted keys, so that equal JSON answers count as one vote."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:
        # Not JSON (e.g. integer keys from msgpack): the prefix keeps it apart from any JSON.
        return b"\0" + repr(value).encode()


def numeric_kind(values: Sequence[Any]) -> Literal["scalar", "vector"] | None:
    """``"scalar"`` when every value is a finite real number, ``"vector"`` when every value is
    a non-empty list of them, all of one length, else ``None`` (they can only be voted on)."""
    if all(is_finite_real(v) for v in values):
        return "scalar"
    lengths = set()
    for value in values:
        if not _is_list(value) or not value or not all(is_finite_real(x) for x in value):
            return None
        lengths.add(len(value))
    return "vector" if len(lengths) == 1 else None


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray)


def weighted_combine(
    order: Sequence[str],
    predictions: Mapping[str, Any],
    weights: Mapping[str, float],
    method: Method,
) -> Combined:
    """The weighted mean or weighted vote of the predictions that arrived, with weights
    renormalised over them; see :class:`ketch.plugins.ensemble.EnsemblePolicy`.

    :param order: the application's models in its order, which breaks ties in votes.
    :param weights: each model's weight, >= 0; models missing from it weigh 0.
    """
    names = [m for m in order if m in predictions]
    if not names:
        # Only reachable when the gateway passes models the policy does not know.
        names = list(predictions)
    w = [weights.get(m, 0.0) for m in names]
    total = math.fsum(w)
    if not (math.isfinite(total) and total > 0):
        # Only models that weigh nothing answered: better an equal say than no answer.
        w = [1.0] * len(names)
        total = float(len(names))
    values = [predictions[m] for m in names]
    if method != "vote":
        kind = numeric_kind(values)
        if kind is not None:
            return _weighted_mean(values, w, total, kind)
    return _weighted_vote(values, w, total)


def _weighted_mean(values: Sequence[Any], w: Sequence[float], total: float, kind: str) -> Combined:
    # Overflow only happens with absurd predictions: an infinite spread gives a confidence of 0.
    if kind == "scalar":
        # Plain floats: numpy's call overhead would cost more than the arithmetic.
        shares = [weight / total for weight in w]
        xs = [float(v) for v in values]
        mean = sum(s * x for s, x in zip(shares, xs, strict=True))
        spread = math.sqrt(
            sum(s * (x - mean) * (x - mean) for s, x in zip(shares, xs, strict=True))
        )
        output: Any = mean
    else:
        share = np.asarray(w, dtype=np.float64) / total
        x = np.asarray(values, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            means = share @ x
            spread = float(np.mean(np.sqrt(share @ np.square(x - means))))
        output = [float(v) for v in means]
    confidence = 1.0 / (1.0 + spread) if math.isfinite(spread) else 0.0
    return Combined(output, confidence)


def _weighted_vote(values: Sequence[Any], w: Sequence[float], total: float) -> Combined:
    tally: dict[bytes, float] = {}
    first: dict[bytes, int] = {}
    for i, value in enumerate(values):
        key = json_key(value)
        tally[key] = tally.get(key, 0.0) + w[i]
        first.setdefault(key, i)
    best = max(tally.values())
    # Sums of float weights that should tie can differ in the last bit.
    tied = [key for key, weight in tally.items() if weight >= best - 1e-12 * max(1.0, best)]
    winner = min(tied, key=first.__getitem__)
    return Combined(values[first[winner]], min(1.0, tally[winner] / total))


def section(state: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``state[key]`` as a mapping (empty when absent), or a ``ValueError`` naming it."""
    value = state.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"state[{key!r}] must be a mapping of model name to value, not {value!r}")
    return value


def read_numbers(
    state: Mapping[str, Any],
    key: str,
    models: Sequence[str],
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> dict[str, float]:
    """The numbers ``state[key]`` holds for ``models``; other models in it are ignored (the
    application no longer has them) and models it lacks are left out (they start fresh)."""
    values = section(state, key)
    return {
        m: check_number(f"state[{key!r}][{m!r}]", values[m], minimum=minimum, maximum=maximum)
        for m in models
        if m in values
    }


def read_log_weights(state: Mapping[str, Any], models: Sequence[str]) -> dict[str, float]:
    """``state["log_weights"]`` for ``models``; a model new to the state starts level with the
    best one (as every model did at first), so it is tried rather than starved."""
    log_weights = read_numbers(state, "log_weights", models)
    top = max(log_weights.values(), default=0.0)
    return {m: log_weights.get(m, top) for m in models}
