"""The ``torch`` runtime: serve a saved PyTorch model (``pip install 'ketch[torch]'``).

The artifact is one of:

- a ``torch.export`` archive (``torch.export.save``, usually ``.pt2``): its input's dtype and
  per-item shape are read from the archive, so requests of the wrong shape get a 400 naming
  the expected one. Export it with a dynamic batch dimension
  (``dynamic_shapes={"x": {0: torch.export.Dim("batch")}}``) to accept any batch size;
- a TorchScript file (``torch.jit.save``, usually ``.pt``);
- a factory, ``FILE.py:function``, called once per worker with no arguments and returning an
  ``nn.Module`` (which may load its own weights).

Each batch is stacked into one tensor of the model's input dtype on ``device``, run under
``torch.inference_mode()``, and answered one row per input (a tuple of outputs gives one list
per input, a dict one dict per input). Options:

- ``device``: ``"cpu"`` (default), ``"cuda"`` or ``"cuda:N"``;
- ``input_dtype``: the input tensor's dtype when the artifact does not say (TorchScript,
  factories); ``"float32"`` by default, ``"int64"`` for token ids;
- ``input_shape``: the per-item input shape when the artifact does not say, e.g. ``[3]``
  (``-1`` for a dimension that may vary), so wrong shapes are refused in the gateway.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from ketch.errors import BatchInputError
from ketch.hookspecs import RegisterRuntime, hookimpl
from ketch.runtime import Runtime
from ketch.specs.signature import TensorSpec
from ketch.types import Outputs

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_DTYPES = (
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "bool",
)


class TorchRuntime(Runtime):
    """A ``torch.export`` archive, a TorchScript file or an ``nn.Module`` factory."""

    default_options: ClassVar[Mapping[str, Any]] = {
        "device": "cpu",
        "input_dtype": None,
        "input_shape": None,
    }

    @classmethod
    def check(cls, artifact: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
        factory = None if artifact is None else _factory_parts(artifact)
        if factory is not None:
            file = factory[0]
            if not Path(file).is_file():
                raise FileNotFoundError(f"no such file: {file!r} (factory {artifact!r})")
            checked = super().check(file, options)
        else:
            checked = super().check(artifact, options)
            if artifact is not None and Path(artifact).is_dir():
                raise ValueError(
                    f"{artifact!r} is a folder: give a torch.export archive, a TorchScript "
                    "file or FILE.py:factory"
                )
        device = checked["device"]
        if not isinstance(device, str) or not _DEVICE.match(device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        dtype = checked["input_dtype"]
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"input_dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        shape = checked["input_shape"]
        if shape is not None and (
            isinstance(shape, str)
            or not isinstance(shape, Sequence)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape)
        ):
            raise ValueError(f"input_shape must be a list of sizes (-1: any), got {shape!r}")
        if shape is not None:
            checked["input_shape"] = [int(d) for d in shape]
        return checked

    def __init__(self, artifact: str | None, options: Mapping[str, Any]) -> None:
        import torch

        super().__init__(artifact, options)
        assert artifact is not None
        self._torch = torch
        self.device = torch.device(self.options["device"])
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device {self.options['device']!r} asked for, but CUDA is not available"
            )
        self.kind, self.module, found = _load(torch, artifact, self.device)
        dtype_name = self.options["input_dtype"] or (found.datatype if found else "float32")
        shape = self.options["input_shape"]
        if shape is not None:
            found = TensorSpec(found.name if found else "input", dtype_name, tuple(shape))
        self.input_dtype = getattr(torch, dtype_name)
        if found is not None:
            self.inputs = (TensorSpec(found.name, dtype_name, found.shape),)

    def predict(self, batch: Any) -> Outputs:
        torch = self._torch
        array = np.ascontiguousarray(batch)
        if self.inputs and not self.inputs[0].accepts(array.shape[1:]):
            # Only the first batch of a new model can get here: once the gateway knows the
            # shape it refuses such requests itself.
            raise BatchInputError(
                f"the model takes inputs of {self.inputs[0].describe()} each, got shape "
                f"{list(array.shape[1:])}"
            )
        with torch.inference_mode():
            if array.dtype.name == "bfloat16":
                # ml_dtypes' bfloat16 is no dtype torch.from_numpy knows: the same 16 bits.
                raw = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
            else:
                raw = torch.from_numpy(array)
            tensor = raw.to(device=self.device, dtype=self.input_dtype)
            result = self.module(tensor)
        return _per_item(torch, result, len(array))

    def describe(self) -> dict[str, Any]:
        return {"format": self.kind, "device": str(self.device)}


def _factory_parts(artifact: str) -> tuple[str, str] | None:
    """``(file, function)`` for ``FILE.py:function``, else None."""
    file, colon, function = artifact.rpartition(":")
    if colon and file.endswith(".py") and function.isidentifier():
        return file, function
    return None


def _load(torch: Any, artifact: str, device: Any) -> tuple[str, Any, TensorSpec | None]:
    """``(format, callable module, input tensor or None)`` for the artifact."""
    factory = _factory_parts(artifact)
    if factory is not None:
        from ketch.specs.loader import import_source

        file, function = factory
        module = getattr(import_source(file), function)()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"{artifact} returned {type(module).__qualname__}, not an nn.Module")
        return "factory", module.to(device).eval(), None
    errors = []
    try:
        program = torch.export.load(artifact)
    except Exception as exc:
        errors.append(f"not a torch.export archive ({type(exc).__name__}: {exc})")
    else:
        return "torch.export", program.module().to(device), _exported_input(torch, program)
    try:
        scripted = torch.jit.load(artifact, map_location=device)
    except Exception as exc:
        errors.append(f"not a TorchScript file ({type(exc).__name__}: {exc})")
    else:
        return "torchscript", scripted.eval(), None
    raise ValueError(f"cannot load {artifact!r}: " + "; ".join(errors))


def _exported_input(torch: Any, program: Any) -> TensorSpec | None:
    """The one user input of an exported program: its dtype and per-item shape."""
    names = list(program.graph_signature.user_inputs)
    if len(names) != 1:
        return None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == names[0]:
            value = node.meta.get("val")
            if value is None or not hasattr(value, "shape"):
                return None
            shape = tuple(d if isinstance(d, int) else -1 for d in value.shape[1:])
            return TensorSpec(names[0], str(value.dtype).removeprefix("torch."), shape)
    return None


def _per_item(torch: Any, result: Any, size: int) -> Outputs:
    if isinstance(result, torch.Tensor):
        tensor = result.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            # numpy has no bfloat16 of its own: ml_dtypes' one, from the same 16 bits.
            bits: np.ndarray = tensor.view(torch.int16).numpy()
            as_bfloat16: np.ndarray = bits.view(ml_dtypes.bfloat16)
            return as_bfloat16
        array: np.ndarray = tensor.numpy()
        return array
    if isinstance(result, tuple | list):
        parts = [_per_item(torch, part, size) for part in result]
        return [[_item(part[i]) for part in parts] for i in range(size)]
    if isinstance(result, Mapping):
        columns = {key: _per_item(torch, value, size) for key, value in result.items()}
        return [{key: _item(column[i]) for key, column in columns.items()} for i in range(size)]
    raise TypeError(f"the model returned {type(result).__qualname__}, not tensors")


def _item(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


@hookimpl
def ketch_register_runtimes(register: RegisterRuntime) -> None:
    register("torch", TorchRuntime)
