"""What a worker's READY says of its model, against what the gateway knows of that version:
the declared tensors, or those the version's first worker announced, which it then keeps."""

from __future__ import annotations

from msgspec.structs import replace

from ketch.specs.models import ModelSpec
from ketch.specs.signature import TensorSpec


def mismatch(known: ModelSpec, announced: ModelSpec) -> str | None:
    """Why a worker announcing ``announced`` may not serve version ``known``: tensors other
    than the ones declared (or learnt from its first worker); None when they agree.

    A worker that announces no tensors (its runtime cannot tell) agrees with any."""
    for kind in ("inputs", "outputs"):
        expected: tuple[TensorSpec, ...] = getattr(known, kind)
        said: tuple[TensorSpec, ...] = getattr(announced, kind)
        if expected and said and said != expected:
            return (
                f"its {kind} ({_tensor_list(said)}) are not the {kind} of model "
                f"{known.label()!r} ({_tensor_list(expected)})"
            )
    return None


def learnt(known: ModelSpec, announced: ModelSpec) -> ModelSpec:
    """``known`` with what the first worker's runtime found where nothing was declared (the
    tensors, so requests are checked against them, and what it says of the model). Once
    known, they never change: a worker that disagrees is refused (:func:`mismatch`)."""
    return replace(
        known,
        inputs=known.inputs or announced.inputs,
        outputs=known.outputs or announced.outputs,
        runtime_info=known.runtime_info or announced.runtime_info,
    )


def _tensor_list(tensors: tuple[TensorSpec, ...]) -> str:
    return ", ".join(tensor.describe() for tensor in tensors)
