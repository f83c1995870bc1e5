"""What a decorated function says of itself: its one batch parameter, whether it takes its
batch as a numpy array or a list (from the parameter's annotation), the tensors it declares
(checked when it is decorated), and the tensors its plain type hints suggest (shown, never
enforced)."""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from msgspec.structs import replace

from ketch.specs.signature import TensorSpec

BatchInput = Literal["list", "numpy"]


def takes_params(func: Callable[..., Any]) -> bool:
    """Whether the function takes each item's request parameters: a second positional
    parameter named ``params`` (``def predict(batch, params)``)."""
    try:
        parameters = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return (
        len(parameters) >= 2 and parameters[1].name == "params" and parameters[1].kind in positional
    )


def require_batch_parameter(func: Callable[..., Any]) -> None:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return  # builtins without a signature: trust the caller
    try:
        signature.bind(None, None) if takes_params(func) else signature.bind(None)
    except TypeError as exc:
        raise TypeError(
            f"model function {func.__qualname__}{signature} must accept the batch as its one "
            f"positional argument ({exc})"
        ) from None


def batch_input_of(func: Callable[..., Any]) -> BatchInput:
    """``"numpy"`` when the batch parameter is annotated as a numpy array, else ``"list"``."""
    try:
        first = next(iter(inspect.signature(func).parameters.values()))
    except (StopIteration, TypeError, ValueError):
        return "list"
    annotation: Any = first.annotation
    if isinstance(annotation, str):
        # Resolve just this parameter's annotation: another one that cannot be resolved
        # (a name imported only under TYPE_CHECKING) must not change the outcome.
        try:
            annotation = eval(annotation, getattr(func, "__globals__", {}))
        except Exception:
            return "numpy" if _NUMPY_ANNOTATION.fullmatch(annotation.strip()) else "list"
    origin = typing.get_origin(annotation) or annotation
    return "numpy" if origin is np.ndarray else "list"


#: ``np.ndarray``, ``numpy.ndarray``, ``npt.NDArray[np.float32]`` and the like, as text.
_NUMPY_ANNOTATION = re.compile(r"(?:\w+\.)*(?:ndarray|NDArray)(?:\[.*\])?")


def declared_tensors(
    value: Sequence[TensorSpec] | None, what: str, name: str
) -> tuple[TensorSpec, ...]:
    """Declared tensors, checked now so a typo fails at import rather than on a request."""
    if value is None:
        return ()
    if isinstance(value, str | bytes | TensorSpec) or not isinstance(value, Sequence):
        raise TypeError(f"{what} of {name!r} must be a list of ketch.TensorSpec, got {value!r}")
    tensors: list[TensorSpec] = []
    for tensor in value:
        if not isinstance(tensor, TensorSpec):
            raise TypeError(f"{what} of {name!r} must be ketch.TensorSpec, got {tensor!r}")
        if not isinstance(tensor.name, str) or not tensor.name:
            raise ValueError(f"{what} of {name!r}: a tensor needs a name, got {tensor.name!r}")
        # bfloat16 is numpy's only through ml_dtypes, which the gateway and workers import.
        if tensor.datatype not in ("str", "bytes", "bfloat16"):
            try:
                np.dtype(tensor.datatype)
            except TypeError:
                raise ValueError(
                    f"{what} of {name!r}: {tensor.name} has datatype {tensor.datatype!r}, "
                    "which is not a numpy dtype name ('float32', 'int64', 'bool'), 'bfloat16', "
                    "'str' nor 'bytes'"
                ) from None
        shape = tuple(tensor.shape) if isinstance(tensor.shape, Sequence) else None
        if shape is None or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
        ):
            raise ValueError(
                f"{what} of {name!r}: {tensor.name} must have a shape of sizes >= 0 (or -1 for "
                f"any size), per item without the batch axis, got {tensor.shape!r}"
            )
        tensors.append(replace(tensor, shape=shape))  # a list given as shape becomes a tuple
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} of {name!r} name a tensor twice: {names}")
    return tuple(tensors)


#: Element types whose hint says what an item holds, as a TensorSpec datatype.
_HINTED_DATATYPES: dict[Any, str] = {
    float: "float64",
    int: "int64",
    bool: "bool",
    str: "str",
    bytes: "bytes",
}


def hinted_tensors(func: Callable[..., Any]) -> tuple[tuple[TensorSpec, ...], ...]:
    """``(inputs, outputs)`` read off plain type hints: ``list[float]`` is one float64 per item,
    ``list[list[str]]`` a variable-length list of strings per item. Anything else (numpy arrays,
    whose hint says neither rank nor dtype for sure, dicts, ``Any``) gives no tensor."""
    try:
        signature = inspect.signature(func)
        first = next(iter(signature.parameters.values()))
    except (StopIteration, TypeError, ValueError):
        return (), ()
    hinted_input = _item_tensor(_resolved(first.annotation, func), "input_0")
    hinted_output = _item_tensor(_resolved(signature.return_annotation, func), "output_0")
    return hinted_input, hinted_output


def _resolved(annotation: Any, func: Callable[..., Any]) -> Any:
    """An annotation, evaluated when it is text (``from __future__ import annotations``);
    None when it cannot be."""
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, getattr(func, "__globals__", {}))
    except Exception:
        return None


def _item_tensor(batch_hint: Any, name: str) -> tuple[TensorSpec, ...]:
    """The tensor of one item of a batch hinted ``list[...]`` (or a ``Sequence``)."""
    if typing.get_origin(batch_hint) not in (list, Sequence):
        return ()
    (item,) = typing.get_args(batch_hint) or (None,)
    shape: tuple[int, ...] = ()
    while typing.get_origin(item) in (list, Sequence) and len(shape) < 8:
        (item,) = typing.get_args(item) or (None,)
        shape += (-1,)
    datatype = _HINTED_DATATYPES.get(item)
    return (TensorSpec(name, datatype, shape),) if datatype is not None else ()
