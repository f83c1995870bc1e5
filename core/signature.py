"""What a model's tensors look like: names, datatypes and per-item shapes.

A runtime reads them from the framework inside the worker; the worker announces them in its
READY, and the gateway checks each request's inputs against them (a wrong shape is a 400 that
names the expected one, never a failed batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class TensorSpec:
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
        return cls(str(data["name"]), str(data["datatype"]), tuple(int(d) for d in data["shape"]))

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether an item of ``shape`` fits this tensor (``-1`` matches any size)."""
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )

    def describe(self) -> str:
        dims = ", ".join("?" if d == -1 else str(d) for d in self.shape)
        return f"{self.name}: {self.datatype}[{dims}]"
