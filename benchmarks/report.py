"""Helpers the benchmark scripts share for printing their figures."""

from __future__ import annotations

import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` made JSON-safe: JSON has no NaN, so a figure that could not be measured (a
    percentile of zero requests, say) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value
