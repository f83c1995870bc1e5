"""The quickstart model: `ketch serve examples/quickstart.py`, then

curl -s -d '{"input": 21}' localhost:8000/models/double/predict
"""

from __future__ import annotations

import ketch


@ketch.model
def double(xs: list[float]) -> list[float]:
    return [2 * x for x in xs]
