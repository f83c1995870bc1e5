"""Open Inference Protocol (KServe V2) datatypes and their numpy counterparts.

V2 names a tensor's element type (``FP32``, ``BYTES``); ketch's :class:`~ketch.TensorSpec` and
the arrays a model sees use numpy dtype names (``float32``, ``str``). BYTES elements travel as
JSON strings, so they become numpy ``str`` arrays here and Python strings for list models.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

#: Every V2 datatype ketch accepts in a request, with the numpy dtype its data becomes.
V2_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "BYTES": np.dtype(np.str_),
}
#: The float types, bfloat16 among them (which numpy's kinds call "V", not "f").
FLOAT_DTYPES = frozenset(V2_TO_NUMPY[v2] for v2 in ("FP16", "FP32", "FP64", "BF16"))

_NUMPY_TO_V2 = {dtype.name: v2 for v2, dtype in V2_TO_NUMPY.items() if v2 != "BYTES"}

#: Which kinds of JSON values (as numpy infers them) each V2 datatype takes: numbers are not
#: silently read as booleans, nor fractions truncated into integers.
_ACCEPTED_KINDS = {"BOOL": "b", "BYTES": "U", "BF16": "iuf"} | {
    v2: ("iuf" if v2.startswith("FP") else "iu") for v2 in V2_TO_NUMPY if v2[0] in "IUF"
}


def v2_datatype(numpy_name: str) -> str | None:
    """The V2 datatype for a numpy dtype name of a :class:`~ketch.TensorSpec` (``float32`` ->
    ``FP32``, ``str`` -> ``BYTES``), or None for a type V2 has no name for in JSON."""
    if numpy_name in ("str", "bytes", "object"):
        return "BYTES"
    try:
        dtype = np.dtype(numpy_name)
    except TypeError:
        return None
    if dtype.kind in "USO":
        return "BYTES"
    return _NUMPY_TO_V2.get(dtype.name)


def v2_datatype_of(array: np.ndarray) -> str | None:
    """The V2 datatype of an output array, or None when it holds what V2 cannot carry."""
    if array.dtype.kind in "US":
        return "BYTES"
    if array.dtype.kind == "O":
        elements = array.ravel().tolist()
        if elements and all(isinstance(e, bytes | str) for e in elements):
            return "BYTES"
        return None
    return _NUMPY_TO_V2.get(array.dtype.name)


def tensor_from_json(datatype: str, shape: list[int], data: object) -> np.ndarray:
    """The array that V2 JSON ``data`` (flat row-major, or nested) of ``shape`` holds.

    Raises ``ValueError`` naming what is wrong: an unknown datatype, values of another kind
    or outside the datatype's range, or a number of elements that is not the shape's.
    """
    dtype = V2_TO_NUMPY.get(datatype)
    if dtype is None:
        known = ", ".join(V2_TO_NUMPY)
        raise ValueError(f"datatype {datatype!r} is not supported; use one of {known}")
    try:
        raw = np.asarray(data)
    except ValueError:
        raise ValueError("data is nested lists of uneven lengths") from None
    if raw.dtype == object:
        raise ValueError("data is nested lists of uneven lengths or of mixed types")
    if raw.size and raw.dtype.kind not in _ACCEPTED_KINDS[datatype]:
        got = "strings" if raw.dtype.kind in "US" else f"{raw.dtype.name} values"
        raise ValueError(f"data of datatype {datatype} cannot hold {got}")
    expected = int(np.prod(shape)) if shape else 1
    if raw.size != expected:
        raise ValueError(f"shape {shape} holds {expected} elements, data has {raw.size}")
    if datatype.startswith(("INT", "UINT")) and raw.size:
        info = np.iinfo(dtype.name)
        if raw.min() < info.min or raw.max() > info.max:
            raise ValueError(f"data has values outside the range of {datatype}")
    with np.errstate(over="ignore"):  # found below, and said in the error
        array = raw.astype(dtype, copy=False)
    if array.dtype in FLOAT_DTYPES and raw.size and not np.isfinite(array).all():
        # JSON holds no infinity: a number too large for the datatype became one.
        raise ValueError(f"data has values outside the range of {datatype}")
    return array.reshape(shape)


def tensor_from_binary(datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """The array in a binary tensor (Triton's binary data extension, what ``tritonclient``
    sends by default): little-endian row-major elements, BYTES as 4-byte length + its bytes
    (an object array of ``bytes``, whatever they hold: :func:`as_element_type` makes them text
    for a model that takes text)."""
    dtype = V2_TO_NUMPY.get(datatype)
    if dtype is None:
        known = ", ".join(V2_TO_NUMPY)
        raise ValueError(f"datatype {datatype!r} is not supported; use one of {known}")
    expected = int(np.prod(shape)) if shape else 1
    if datatype != "BYTES":
        if len(raw) != expected * dtype.itemsize:
            raise ValueError(
                f"shape {shape} of {datatype} takes {expected * dtype.itemsize} bytes, "
                f"got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=_little_endian(dtype)).astype(dtype).reshape(shape)
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ValueError("a BYTES element's length runs past the end of its data")
        size = int.from_bytes(raw[offset : offset + 4], "little")
        if offset + 4 + size > len(raw):
            raise ValueError("a BYTES element runs past the end of its data")
        elements.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    if len(elements) != expected:
        raise ValueError(f"shape {shape} holds {expected} elements, data has {len(elements)}")
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(shape)


def _little_endian(dtype: np.dtype[Any]) -> np.dtype[Any]:
    # ml_dtypes' types (bfloat16) have no byte order to set: they are the host's, which is
    # little-endian on every machine ketch runs on.
    return dtype if dtype.kind == "V" else dtype.newbyteorder("<")


def as_element_type(array: np.ndarray, numpy_name: str | None) -> np.ndarray:
    """A BYTES tensor as the model takes its elements: ``bytes`` (an object array) for a
    tensor declared ``"bytes"``, else UTF-8 text (a ``str`` array). Other tensors as they are.

    Raises ``ValueError`` for bytes that are not UTF-8 where text is taken.
    """
    if array.dtype.kind not in "OUS":
        return array
    if numpy_name == "bytes":
        if array.dtype.kind == "O":
            return array
        flat = np.empty(array.size, dtype=object)
        flat[:] = [str(e).encode() for e in array.ravel().tolist()]
        return flat.reshape(array.shape)
    if array.dtype.kind == "U":
        return array
    try:
        texts = [e.decode() if isinstance(e, bytes) else str(e) for e in array.ravel().tolist()]
    except UnicodeDecodeError:
        raise ValueError(
            "BYTES elements must be UTF-8 text for this model; declare the input "
            "TensorSpec(..., 'bytes', ...) to take raw bytes"
        ) from None
    return np.asarray(texts, dtype=np.str_).reshape(array.shape)


def tensor_to_binary(datatype: str, array: np.ndarray) -> bytes:
    """``array`` as Triton's binary tensor data: little-endian row-major elements, BYTES as
    4-byte little-endian length + the element's bytes (text as UTF-8)."""
    if datatype != "BYTES":
        return np.ascontiguousarray(array, dtype=_little_endian(array.dtype)).tobytes()
    parts: list[bytes] = []
    for element in array.ravel().tolist():
        raw = element if isinstance(element, bytes) else str(element).encode()
        parts += [len(raw).to_bytes(4, "little"), raw]
    return b"".join(parts)


def cast_output(array: np.ndarray, datatype: str) -> np.ndarray:
    """``array`` (a model's stacked output) as the V2 ``datatype`` its model declares.

    A cast must keep every value: integers take only whole numbers in their range (``2.0`` may
    become ``INT64``, ``2.5`` may not), ``BOOL`` only 0 and 1, floats any number that does not
    overflow to infinity (rounded to their precision); text and numbers never turn into each
    other. Raises ``ValueError`` saying which values cannot be cast otherwise.
    """
    dtype = V2_TO_NUMPY[datatype]
    text = array.dtype.kind in "US"
    if datatype == "BYTES" or text:
        if text == (datatype == "BYTES"):
            return array
        raise ValueError("numbers are not text" if datatype == "BYTES" else "text is no number")
    if array.dtype.kind not in "biuf" and array.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{array.dtype.name} values are not numbers")
    if array.dtype == dtype:
        return array
    # Casting NaN or out-of-range values warns; whether every value survived is checked below.
    with np.errstate(all="ignore"):
        cast = array.astype(dtype)
    if dtype in FLOAT_DTYPES:
        lost, why = np.isfinite(array) & ~np.isfinite(cast), "values overflow it"
    elif datatype == "BOOL":
        lost, why = cast != array, "values are not 0 or 1"
    else:
        lost, why = cast != array, "values are not whole numbers in its range"
    if lost.any():
        raise ValueError(f"{why}, such as {array[lost].flat[0].item()!r}")
    return cast
