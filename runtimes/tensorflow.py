"""The ``tensorflow`` runtime: serve a TensorFlow SavedModel (``pip install 'ketch[tensorflow]'``).

The artifact is a SavedModel folder, as ``tf.saved_model.save`` or Keras' ``model.export``
write it. The worker loads it with ``tf.saved_model.load`` and calls one of its signatures,
``signature`` (``"serving_default"`` unless told), as a concrete function: Keras is not
involved. The signature's inputs and outputs (names, dtypes, per-item shapes; listed by name,
as a signature does not order them) are shown by ``GET /models``.

What one input of a request is depends on the signature:

- one input tensor: that tensor's value for one item (``[1.0, 2.0, 3.0]`` for
  ``x: float32[None, 3]``); ``{"x": [1.0, 2.0, 3.0]}``, naming it, works too;
- several input tensors: a JSON object with a value for each (``{"a": [1.0, 2.0], "b": 7}``
  for ``a: float32[None, 2]`` and ``b: int64[None]``).

Both kinds come through one class, whose ``batch_input`` is fixed before any worker has read
the signature, so batches come as lists (the gateway cannot stack objects) and the runtime
stacks them itself: each value is checked against its tensor (its shape; numbers for numeric
tensors, whole numbers within range for integer ones, booleans for ``tf.bool``, strings for
``tf.string``) and cast to the signature's dtype, so a wrong shape or a missing or unknown name
is a 400 naming what the model takes. The gateway cannot check such inputs before batching,
so a malformed input fails the batch it landed in: requests batched with it get the same 400.
Inputs whose variable dimensions differ (sequences of different lengths) are run in separate
calls rather than refused or padded.

The leading dimension of the signature's tensors is the batch: ``None`` takes any batch size;
a fixed size ``k`` is fed chunks of ``k`` (the last one padded with copies of its last input,
whose outputs are dropped). A signature with a scalar input, or whose tensors disagree on a
fixed leading size, has no batch axis: each input holds whole tensors, one call each.

With one output tensor, each input is answered with its row of it; with several, with a JSON
object ``{output_name: row}``. ``tf.string`` outputs are decoded as UTF-8 (bytes that are not
UTF-8 come as ``{"b64": "..."}``, TensorFlow Serving's convention); bfloat16 ones as floats.

Options:

- ``signature``: the name of the signature to serve (``"serving_default"``).

Where the model is declared, the folder is checked without importing TensorFlow: it must hold
``saved_model.pb`` (or the ``.pbtxt`` / chunked ``.cpb`` forms TensorFlow also reads), and
``saved_model.pb`` is read as far as its signatures (its protobuf, skipping the graph), so a
misspelt ``signature`` or a corrupt file stops ``ketch serve`` at once, naming the path and the
signatures it has, rather than failing in every worker started for it.

In the worker, TensorFlow is imported quietened (``TF_CPP_MIN_LOG_LEVEL=2`` unless set); with
``threads=N`` its own thread pools are capped at ``N`` too; a GPU build allocates GPU memory as
it needs it rather than all at once, so several workers can share a GPU. TensorFlow does not
survive a fork once it has run, so ``preload=True`` (workers forked from a template that loaded
the model) cannot work: such a worker answers each batch with an error saying so.
"""

from __future__ import annotations

import base64
import importlib
import mmap
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ketch.errors import BatchInputError, BatchOutputError
from ketch.hookspecs import RegisterRuntime, hookimpl
from ketch.runtime import Runtime
from ketch.specs.models import BatchInput
from ketch.specs.signature import TensorSpec
from ketch.types import Outputs

#: The files a SavedModel folder holds its graph and signatures in (TensorFlow reads either).
_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt", "saved_model.cpb")
#: Keras files people mistake for SavedModels; the error tells them how to export one.
_KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


class TensorFlowRuntime(Runtime):
    """A TensorFlow SavedModel folder, served through one of its signatures."""

    # Lists, stacked in predict: see the module docstring.
    batch_input: ClassVar[BatchInput] = "list"
    default_options: ClassVar[Mapping[str, Any]] = {"signature": "serving_default"}

    @classmethod
    def check(cls, artifact: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
        checked = super().check(artifact, options)
        assert artifact is not None  # super().check requires a path
        folder = Path(artifact)
        if not folder.is_dir():
            hint = (
                ": a Keras file; export a SavedModel with model.export(FOLDER)"
                if folder.suffix.lower() in _KERAS_SUFFIXES
                else ""
            )
            raise ValueError(
                f"{artifact!r} is a file, not a SavedModel folder (one holding saved_model.pb)"
                + hint
            )
        if not any((folder / name).is_file() for name in _SAVED_MODEL_FILES):
            raise ValueError(
                f"{artifact!r} holds no saved_model.pb: not a SavedModel folder "
                "(tf.saved_model.save or Keras' model.export write one)"
            )
        signature = checked["signature"]
        if not isinstance(signature, str) or not signature:
            raise ValueError(f"signature must be a signature's name, got {signature!r}")
        available = saved_signature_names(folder / "saved_model.pb")
        if available is not None and signature not in available:
            raise ValueError(
                f"{artifact!r} has no signature {signature!r}; it has: "
                + (", ".join(sorted(available)) or "none")
            )
        return checked

    def __init__(self, artifact: str | None, options: Mapping[str, Any]) -> None:
        super().__init__(artifact, options)
        assert artifact is not None
        # TensorFlow logs to stderr from C++ as it loads; workers' stderr is the gateway's.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            # threads= caps the math libraries through OMP_NUM_THREADS, which TensorFlow's own
            # thread pools ignore; these are read when its runtime starts.
            os.environ.setdefault("TF_NUM_INTRAOP_THREADS", threads)
            os.environ.setdefault("TF_NUM_INTEROP_THREADS", threads)
        # import_module: a module typed Any, so type checking needs no TensorFlow stubs.
        tf: Any = importlib.import_module("tensorflow")
        self._tf = tf
        _configure(tf)
        # Keep the loaded object: its signatures hold only weak references to its variables.
        self._loaded = tf.saved_model.load(artifact)
        self._pid = os.getpid()
        self.signature: str = self.options["signature"]
        signatures = self._loaded.signatures
        if self.signature not in signatures:
            raise ValueError(
                f"{artifact!r} has no signature {self.signature!r}; it has: "
                + (", ".join(sorted(signatures.keys())) or "none")
            )
        self._function = signatures[self.signature]
        _, specs = self._function.structured_input_signature
        # A signature's tensors are named, not ordered (its order changes from one load to the
        # next): by name, GET /models and error messages always list them alike.
        #: The signature's input tf.TensorSpecs by name.
        self._specs: dict[str, Any] = {
            name: _dense(tf, name, specs[name]) for name in sorted(specs)
        }
        self._names = tuple(self._specs)
        self._dtypes = {name: np.dtype(spec.dtype.as_numpy_dtype) for name, spec in specs.items()}
        shapes = [spec.shape for spec in self._specs.values()]
        fixed = {shape[0] for shape in shapes if shape.rank and shape[0] is not None}
        #: Whether the leading dimension of every input is the batch's.
        self._batched = bool(shapes) and all(shape.rank for shape in shapes) and len(fixed) <= 1
        #: The batch size the signature insists on, if any.
        self._chunk: int | None = next(iter(fixed)) if self._batched and fixed else None
        self.inputs = tuple(self._tensor(name, spec) for name, spec in self._specs.items())
        outputs = self._function.structured_outputs
        if not isinstance(outputs, Mapping):
            outputs = {"output_0": outputs}
        self.outputs = tuple(self._tensor(name, outputs[name]) for name in sorted(outputs))
        self._by_name = {tensor.name: tensor for tensor in self.inputs}
        #: What the model takes, as error messages say it.
        self._expected = "{" + ", ".join(tensor.describe() for tensor in self.inputs) + "}"

    def _tensor(self, name: str, spec: Any) -> TensorSpec:
        """A signature's tensor as ketch describes it: per item, without the batch axis."""
        dims = spec.shape.as_list() if spec.shape.rank is not None else []
        if self._batched and dims:
            dims = dims[1:]
        shape = tuple(-1 if size is None else int(size) for size in dims)
        return TensorSpec(name, _datatype(self._tf, spec.dtype), shape)

    def predict(self, batch: Any) -> Outputs:
        if os.getpid() != self._pid:
            # TensorFlow's runtime does not survive a fork (its thread pools stay behind): a
            # worker forked from a template that loaded the model would hang on its first batch.
            raise RuntimeError(
                "TensorFlow cannot run in a worker forked from a process that loaded the model "
                "(preload=True): deploy this model without preload"
            )
        rows = [self._row(item) for item in batch]
        if not rows:
            return []
        # Inputs whose variable dimensions differ cannot share a tensor: one call per shape.
        groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(tuple(row[name].shape for name in self._names), []).append(index)
        if len(groups) == 1 and self._batched and self._chunk is None:
            columns = self._call(_stacked(rows, self._names))
            if len(columns) == 1:
                # The common case, answered as one array (a buffer on the way to the gateway).
                ((name, column),) = columns.items()
                _check_rows(name, column, len(rows))
                return column.tolist() if column.dtype == object else column
            return _answers(columns, len(rows))
        answers: list[Any] = [None] * len(rows)
        for indices in groups.values():
            for index, answer in zip(indices, self._run([rows[i] for i in indices]), strict=True):
                answers[index] = answer
        return answers

    def _row(self, item: Any) -> dict[str, np.ndarray]:
        """One input as an array per tensor, cast to its dtype; BatchInputError if it does not
        fit the signature."""
        if not isinstance(item, Mapping):
            if len(self._names) != 1:
                raise BatchInputError(
                    f"the model takes a JSON object per input, {self._expected}; "
                    f"got {type(item).__name__}"
                )
            item = {self._names[0]: item}
        missing = [name for name in self._names if name not in item]
        unknown = sorted(str(key) for key in item if key not in self._specs)
        if missing or unknown:
            problems = [f"lacks {', '.join(missing)}"] if missing else []
            problems += [f"has unknown name(s) {', '.join(unknown)}"] if unknown else []
            raise BatchInputError(
                f"an input {' and '.join(problems)}: the model takes {self._expected}"
            )
        return {
            name: _cast(self._by_name[name], self._dtypes[name], item[name]) for name in self._names
        }

    def _run(self, rows: list[dict[str, np.ndarray]]) -> Iterator[Any]:
        """The answers for rows of one shape, in chunks of the signature's batch size (one
        row per call without a batch axis)."""
        if not self._batched:
            for row in rows:
                columns = self._call(row)
                if len(columns) == 1:
                    yield _item(next(iter(columns.values())))
                else:
                    yield {name: _item(value) for name, value in columns.items()}
            return
        size = self._chunk or len(rows)
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            # A fixed batch size must be met: pad with copies of the last row, answers dropped.
            padded = chunk + [chunk[-1]] * (size - len(chunk))
            yield from _answers(self._call(_stacked(padded, self._names)), size)[: len(chunk)]

    def _call(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The signature's outputs for one call, as arrays that can travel."""
        tf = self._tf
        tensors = {
            name: tf.constant(arrays[name], dtype=self._specs[name].dtype) for name in self._names
        }
        result = self._function(**tensors)
        if not isinstance(result, Mapping):
            result = {"output_0": result}
        return {name: _numpy(result[name].numpy()) for name in sorted(result)}

    def describe(self) -> dict[str, Any]:
        return {"signature": self.signature, "tensorflow": self._tf.__version__}


def _configure(tf: Any) -> None:
    """Settings TensorFlow takes only before it runs its first operation."""
    for gpu in tf.config.list_physical_devices("GPU"):
        # By default the first process takes all of a GPU's memory, starving other workers.
        tf.config.experimental.set_memory_growth(gpu, True)


def _dense(tf: Any, name: str, spec: Any) -> Any:
    """``spec`` if it is a dense tensor of known rank, which is what requests can give."""
    if not isinstance(spec, tf.TensorSpec):
        raise ValueError(
            f"input {name!r} is a {type(spec).__name__}: this runtime feeds dense tensors only"
        )
    if spec.shape.rank is None:
        raise ValueError(
            f"input {name!r} has no known rank: export the signature with a TensorSpec whose "
            "shape lists its dimensions (None for the batch and those that vary)"
        )
    return spec


def _datatype(tf: Any, dtype: Any) -> str:
    """A numpy dtype name for a TensorFlow dtype (``"str"`` for tf.string)."""
    if dtype == tf.string:
        return "str"
    return str(np.dtype(dtype.as_numpy_dtype).name)


def _cast(tensor: TensorSpec, dtype: np.dtype[Any], value: Any) -> np.ndarray:
    """``value`` as one item of ``tensor`` (of numpy ``dtype``); BatchInputError naming the
    tensor if it is not one."""
    wanted = tensor.describe().partition(": ")[2]
    takes = f"input {tensor.name!r} takes {wanted} per item"
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise BatchInputError(f"{takes}, got nested lists of uneven lengths") from None
    if array.dtype == object:
        raise BatchInputError(f"{takes}, got values that are neither numbers nor strings")
    if not tensor.accepts(array.shape):
        raise BatchInputError(f"{takes}, got shape {list(array.shape)}")
    kind = array.dtype.kind
    if tensor.datatype == "str":
        if kind == "U":
            return array  # TensorFlow encodes str as UTF-8
    elif tensor.datatype == "bool":
        if kind == "b":
            return array
    elif kind in "biuf":
        if dtype.kind in "iu":
            # JSON has one kind of number: refuse rather than truncate 1.5 or wrap 2**40.
            if kind == "f" and not np.array_equal(array, np.trunc(array)):
                raise BatchInputError(f"{takes}, got numbers that are not integers")
            limits = np.iinfo(dtype)
            if array.size and (array.min() < limits.min or array.max() > limits.max):
                raise BatchInputError(f"{takes}, got a number out of {dtype.name}'s range")
        return array.astype(dtype)
    kinds = {"U": "strings", "b": "booleans", "f": "numbers", "i": "integers", "u": "integers"}
    raise BatchInputError(f"{takes}, got {kinds.get(kind, array.dtype.name)}")


def _stacked(rows: list[dict[str, np.ndarray]], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Rows of one shape as one array per input, the batch first."""
    return {name: np.stack([row[name] for row in rows]) for name in names}


def _numpy(array: np.ndarray) -> np.ndarray:
    """An output array as it can travel: strings decoded, extension floats (bfloat16) widened."""
    if array.dtype == object:
        decoded: np.ndarray = np.frompyfunc(_text, 1, 1)(array)
        return np.asarray(decoded, dtype=object)
    if array.dtype.kind == "V":
        return array.astype(np.float32)
    return array


def _text(value: Any) -> Any:
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(value).decode("ascii")}


def _answers(columns: Mapping[str, np.ndarray], size: int) -> list[Any]:
    """One answer per row of the batch: the output's row, or a dict of the outputs' rows."""
    for name, column in columns.items():
        _check_rows(name, column, size)
    if len(columns) == 1:
        (column,) = columns.values()
        return [_item(column[i]) for i in range(size)]
    return [{name: _item(column[i]) for name, column in columns.items()} for i in range(size)]


def _check_rows(name: str, column: np.ndarray, size: int) -> None:
    if column.ndim == 0 or column.shape[0] != size:
        raise BatchOutputError(
            f"output {name!r} has shape {list(column.shape)}, not one row per input ({size})"
        )


def _item(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


def saved_signature_names(path: Path) -> set[str] | None:
    """The signature names a ``saved_model.pb`` declares, read without TensorFlow; None when
    there is no such file (TensorFlow also reads ``saved_model.pbtxt`` and the chunked
    ``saved_model.cpb``, which this does not). ValueError naming the file if it is not a
    SavedModel.

    It walks the protobuf wire format: ``SavedModel.meta_graphs`` (field 2), each
    ``MetaGraphDef.signature_def`` (field 5, a map whose entries have the key as field 1).
    The file is mapped, not read: the graph it mostly holds is skipped over, never loaded.
    """
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            raise ValueError(f"{str(path)!r} is empty, not a SavedModel")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                return _signature_names(data)
            except (ValueError, UnicodeDecodeError) as exc:
                # TensorFlow would refuse it too, in every worker started for it.
                raise ValueError(f"{str(path)!r} is not a SavedModel ({exc})") from None


def _signature_names(data: mmap.mmap) -> set[str]:
    names: set[str] = set()
    meta_graphs = 0
    for field, meta_graph in _length_fields(data, 0, len(data)):
        if field != 2:
            continue
        meta_graphs += 1
        for inner, entry in _length_fields(data, *meta_graph):
            if inner != 5:
                continue
            for key_field, key in _length_fields(data, *entry):
                if key_field == 1:
                    names.add(data[key[0] : key[1]].decode("utf-8"))
    if not meta_graphs:
        raise ValueError("it holds no meta graph")
    # Entries such as __saved_model_init_op are TensorFlow's own, not signatures it offers.
    return {name for name in names if not name.startswith("__")}


def _length_fields(data: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, tuple[int, int]]]:
    """The length-delimited fields of the message in ``data[start:end]``, as
    ``(field number, (start, end))``; other fields are skipped. ValueError if malformed."""
    position = start
    while position < end:
        tag, position = _varint(data, position, end)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, position = _varint(data, position, end)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _varint(data, position, end)
            if position + length > end:
                raise ValueError(f"a field at byte {position} runs past its message")
            yield field, (position, position + length)
            position += length
        else:
            raise ValueError(f"wire type {wire_type} at byte {position}: corrupt protobuf")
    if position != end:
        raise ValueError(f"the last field of the message ending at byte {end} runs past it")


def _varint(data: mmap.mmap, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= end:
            raise ValueError(f"a number at byte {position} runs past its message")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


@hookimpl
def ketch_register_runtimes(register: RegisterRuntime) -> None:
    register("tensorflow", TensorFlowRuntime)
