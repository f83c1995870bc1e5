"""What a model's tensors look like: names, datatypes and per-item shapes.

A runtime reads them from the framework inside the worker; the worker announces them in its
READY, and the gateway checks each request's inputs against them (a wrong shape is a 400 that
names the expected one, never a failed batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np


class TensorSpec(msgspec.Struct, frozen=True):
    """One input or output tensor of a model, per item of a batch.

    :param name: the tensor's name in the framework (``"input_1"``, ``"x"``).
    :param datatype: a numpy dtype name (``"float32"``, ``"int64"``, ``"bool"``, ``"str"``).
    :param shape: the shape of one item, without the batch axis; ``-1`` for a dimension that
        may vary.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        return msgspec.convert(data, cls)

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether an item of ``shape`` fits this tensor (``-1`` matches any size)."""
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )

    def describe(self) -> str:
        return f"{self.name}: {self.type_name()}"

    def type_name(self) -> str:
        """``float32[3, ?]``: the datatype and per-item shape, ``?`` where it varies."""
        dims = ", ".join("?" if d == -1 else str(d) for d in self.shape)
        return f"{self.datatype}[{dims}]"

    @property
    def numeric(self) -> bool:
        """Whether the tensor holds numbers (or booleans), not text."""
        if self.datatype in ("str", "bytes"):
            return False
        try:
            return np.dtype(self.datatype).kind in "biufc"
        except TypeError:
            return True  # a framework's own number type (bfloat16) that numpy does not name


def item_problem(tensors: Sequence[TensorSpec], value: Any) -> str | None:
    """Why ``value`` (one input of a request, as parsed JSON) cannot be one item of a model
    taking ``tensors``; None when it can.

    With one tensor, an input is its value (or ``{name: value}``); with several, an object with
    a value for each name (other keys are left to the model).
    """
    if not isinstance(value, dict):
        if len(tensors) == 1:
            return _value_problem(tensors[0], value)
        names = ", ".join(t.name for t in tensors)
        return f"an input must be an object with {names}, got a JSON {_kind(value)}"
    for tensor in tensors:
        if tensor.name not in value:
            return f"an input lacks {tensor.name}"
        if problem := _value_problem(tensor, value[tensor.name]):
            return problem
    return None


def _value_problem(tensor: TensorSpec, value: Any) -> str | None:
    takes = f"{tensor.name} takes {tensor.type_name()} per item, got"
    if value is None:
        return f"{takes} null"
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return f"{takes} nested lists of uneven lengths"
    if array.dtype == object:
        return f"{takes} nested lists of uneven lengths or mixed types"
    if not tensor.accepts(array.shape):
        return f"{takes} shape {list(array.shape)}"
    if tensor.numeric and array.dtype.kind not in "biuf":
        return f"{takes} {'strings' if array.dtype.kind in 'US' else array.dtype.name}"
    if not tensor.numeric and array.dtype.kind not in "US":
        return f"{takes} numbers"
    return None


def _kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")
