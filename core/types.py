"""Type aliases shared across modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import numpy as np

#: One output per input of a batch: a list, or an array whose first axis is the batch.
Outputs: TypeAlias = "list[Any] | tuple[Any, ...] | np.ndarray[Any, Any]"

#: A batch predict function as a runtime builds it inside a worker.
Predict: TypeAlias = Callable[[list[Any]], Outputs]
