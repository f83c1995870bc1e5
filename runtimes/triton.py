"""The ``triton`` runtime: forward batches to an NVIDIA Triton Inference Server
(``pip install 'ketch[triton]'``, which brings ``tritonclient``).

This is how ketch serves GPU models: Triton runs them (TensorRT, ONNX, PyTorch, Python
backends, ...), and ketch puts its gateway, batching, caching and applications in front. A
deployment names the server and the model; there is no file:

    resnet = ketch.deploy("resnet", runtime="triton", url="gpu-box:8001", model="resnet50",
                          protocol="grpc", max_batch_size=64)

On the command line the artifact is ``[http://|grpc://]HOST:PORT/MODEL[/VERSION]`` (HTTP
unless the scheme says ``grpc``); it may also be ``path=`` in place of ``url`` and ``model``:

    ketch serve --model resnet=triton:grpc://gpu-box:8001/resnet50

Options:

- ``url``: ``HOST:PORT`` of Triton's HTTP endpoint (8000 by default) or gRPC one (8001), with
  no scheme; required (or from the artifact);
- ``model``: the model's name on the server; required (or from the artifact);
- ``model_version``: ``""`` (default) for the version Triton's policy serves, else a number;
- ``protocol``: ``"http"`` (default) or ``"grpc"``;
- ``timeout_s``: network timeout of each call to the server (60 s);
- ``ready_timeout_s``: how long a starting worker waits for the model to be ready (60 s).

Loading (in the worker): the worker waits until Triton says the model is ready, retrying a
server that cannot be reached or is still loading, for up to ``ready_timeout_s``. It stops at
once when the server's repository index shows the model missing or failed to load (a server
whose index is restricted or empty, as PyTriton's, cannot tell: its workers wait). The
failure names the url and the model; the worker exits and requests get it in their 503. With
``ready_timeout_s`` under ketch's 10 s "stable run", five such exits in a row mark the model
unhealthy; above it, ketch keeps restarting the worker until the server comes up. The
model's metadata gives its tensors (Triton datatypes become numpy names, ``BYTES`` becomes
``"str"``) and its config ``max_batch_size``; when that is above 0, the per-item shapes drop
Triton's batch dimension. Each process opens its own connection on its first batch, so
``preload=True`` works over both protocols (nothing is shared across the fork).

Inputs: each request input is one item. For a model with one input tensor, the item is that
tensor (nested lists of numbers, strings for ``BYTES``), or ``{name: tensor}``; with several,
it is ``{name: tensor, ...}`` holding every input the config does not mark optional (and any
optional ones wanted). The required inputs are the tensors announced to the gateway, which
refuses an item of the wrong shape or kind with a 400 naming what the model takes, before it
joins a batch; the optional ones are listed in ``GET /models``' ``runtime_info``. The worker
checks again (the first requests may come before any worker announced the tensors), and also
refuses a key that names no input and values that do not fit the datatype (floats for an
integer tensor, out-of-range integers). Items are cast to each tensor's datatype, grouped by
shape (a variable dimension may differ between requests), stacked per tensor, and sent in
calls of at most the model's ``max_batch_size`` items (one call per item when that is 0).

Outputs: a model with one output tensor answers each input with its row of it; one with
several answers a dict ``{name: row}`` per input. ``BYTES`` outputs are decoded as UTF-8
(invalid bytes replaced). Triton refusing the inputs is a 400; any other failure of a call
raises :class:`TritonError`, whose message names the server and the model (a 500).

The runtime takes batches as lists (``batch_input = "list"``), not stacked arrays: a numpy
batch is one array, which cannot hold a dict of named tensors, and the class attribute is
fixed before anyone knows how many inputs the model has. A refusal in the worker fails the
whole batch the item is in, which is why the gateway's check comes first.
"""

from __future__ import annotations

import importlib
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ketch.errors import BatchInputError
from ketch.hookspecs import RegisterRuntime, hookimpl
from ketch.runtime import Runtime
from ketch.specs.models import BatchInput
from ketch.specs.signature import TensorSpec
from ketch.types import Outputs

PROTOCOLS = ("http", "grpc")
#: Triton's datatypes as ``TensorSpec`` names them (numpy's names; ``BYTES`` holds strings).
DATATYPES: Mapping[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BF16": "bfloat16",
    "BYTES": "str",
}
_HOST_PORT = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.\-_]*[A-Za-z0-9])?):(?P<port>\d{1,5})$"
)
_ADDRESS = re.compile(
    r"^(?:(?P<protocol>[A-Za-z][A-Za-z0-9+.\-]*)://)?(?P<url>[^/]+)/(?P<model>[^/]+)"
    r"(?:/(?P<model_version>[^/]+))?/?$"
)
#: The numpy kinds of values each kind of numeric tensor takes (then cast to it).
_FITS: Mapping[str, str] = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
#: Triton's statuses for a request whose inputs it refuses: HTTP's and gRPC's.
_BAD_REQUEST = ("400", "StatusCode.INVALID_ARGUMENT")
#: Pause between two looks at a model that is not ready yet.
_POLL_S = 0.25


class TritonError(RuntimeError):
    """A call to the Triton server failed; the message names the server and the model."""


@dataclass(frozen=True, slots=True)
class _Tensor:
    """One input or output as the model's metadata declares it."""

    spec: TensorSpec
    triton_datatype: str
    #: What values are checked against (float32 for BF16, which numpy lacks).
    check_dtype: np.dtype[Any]
    #: What tritonclient sends (ml_dtypes' bfloat16 for BF16, object for BYTES).
    wire_dtype: np.dtype[Any]
    optional: bool = False

    @property
    def is_bytes(self) -> bool:
        return self.triton_datatype == "BYTES"


class TritonRuntime(Runtime):
    """A model served by a Triton Inference Server, called over HTTP or gRPC."""

    batch_input: ClassVar[BatchInput] = "list"  # see the module docstring for why
    artifact_is_path: ClassVar[bool] = False
    default_options: ClassVar[Mapping[str, Any]] = {
        "url": None,
        "model": None,
        "model_version": "",
        "protocol": "http",
        "timeout_s": 60.0,
        "ready_timeout_s": 60.0,
    }

    @classmethod
    def check(cls, artifact: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
        checked = super().check(artifact, options)
        if artifact is not None:
            for key, value in _parse_address(artifact).items():
                if key in options and str(options[key]) != value:
                    raise ValueError(
                        f"{artifact!r} says {key}={value!r} but the options say "
                        f"{key}={options[key]!r}: give it once"
                    )
                checked[key] = value
        url = checked["url"]
        if url is None:
            raise ValueError("the triton runtime needs url='HOST:PORT' (the Triton server)")
        if not isinstance(url, str) or "://" in url:
            raise ValueError(
                f"url must be 'HOST:PORT' without a scheme (protocol= chooses http or grpc), "
                f"got {url!r}"
            )
        match = _HOST_PORT.match(url)
        if match is None or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"url must be 'HOST:PORT' (e.g. 'localhost:8000'), got {url!r}")
        model = checked["model"]
        if model is None:
            raise ValueError("the triton runtime needs model= (the model's name on the server)")
        if not isinstance(model, str) or not model or "/" in model or model != model.strip():
            raise ValueError(f"model must be a model name as Triton knows it, got {model!r}")
        checked["model_version"] = _checked_version(checked["model_version"])
        if checked["protocol"] not in PROTOCOLS:
            raise ValueError(f"protocol must be 'http' or 'grpc', got {checked['protocol']!r}")
        for key in ("timeout_s", "ready_timeout_s"):
            value = checked[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{key} must be a number of seconds above 0, got {value!r}")
            checked[key] = float(value)
        return checked

    def __init__(self, artifact: str | None, options: Mapping[str, Any]) -> None:
        super().__init__(artifact, options)
        self.options = self.check(artifact, options)
        self.url: str = self.options["url"]
        self.model: str = self.options["model"]
        self.model_version: str = self.options["model_version"]
        self.protocol: str = self.options["protocol"]
        self.timeout_s: float = self.options["timeout_s"]
        where = f" version {self.model_version}" if self.model_version else ""
        #: How errors name the model.
        self.label = f"Triton model {self.model!r}{where} at {self.url} ({self.protocol})"
        # Imported by name so that this module (imported wherever models are declared) never
        # needs tritonclient, and the protocol picks its client.
        try:
            self._client_module: Any = importlib.import_module(f"tritonclient.{self.protocol}")
            utils: Any = importlib.import_module("tritonclient.utils")
        except ImportError as exc:
            raise ImportError(
                f"the triton runtime needs tritonclient with {self.protocol} support where its "
                f"workers run: pip install 'ketch[triton]' ({exc})"
            ) from None
        self._server_error: type[Exception] = utils.InferenceServerException
        ready_timeout_s = self.options["ready_timeout_s"]
        # No call while loading may outlast the wait for readiness (a silent host would
        # hold HTTP's first probe for timeout_s).
        client = self._connect(max(min(self.timeout_s, ready_timeout_s), 1.0))
        try:
            self._wait_until_ready(client, ready_timeout_s)
            metadata = self._call(client.get_model_metadata, self.model, self.model_version)
            config = self._call(client.get_model_config, self.model, self.model_version)
        except TritonError:
            raise
        except Exception as exc:
            raise TritonError(
                f"{self.label}: cannot read the model's metadata: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            # Each process opens its own connection on its first batch: a preloaded template
            # forks its workers after loading, and sockets or gRPC channels must not be
            # shared across a fork.
            client.close()
        self._client: Any = None
        self._client_pid = -1
        if self.protocol == "grpc":
            config = config.get("config", config)  # gRPC's JSON wraps it; HTTP's does not
        self.max_batch_size = int(config.get("max_batch_size", 0))  # gRPC's JSON omits a 0
        self.platform = str(metadata.get("platform") or config.get("backend") or "")
        self.versions = [str(v) for v in metadata.get("versions", [])]
        optional = {t["name"] for t in config.get("input", []) if t.get("optional")}
        self._inputs = [self._tensor(t, optional, utils) for t in metadata["inputs"]]
        self._outputs = [self._tensor(t, set(), utils) for t in metadata["outputs"]]
        self._by_name = {t.spec.name: t for t in self._inputs}
        required = [t for t in self._inputs if not t.optional]
        self._required = {t.spec.name for t in required}
        # The gateway takes every announced input as required: announce only those.
        self.inputs = tuple(t.spec for t in required)
        # A bare (not {name: value}) item is the one input it can only be.
        bare = required or self._inputs
        self._bare = bare[0] if len(bare) == 1 else None
        self.outputs = tuple(t.spec for t in self._outputs)
        # Every output is asked for by name so that HTTP sends them as binary data, not JSON.
        self._requested = [
            self._client_module.InferRequestedOutput(t.spec.name) for t in self._outputs
        ]

    def predict(self, batch: Any) -> Outputs:
        items = list(batch)
        groups: dict[tuple[tuple[str, tuple[int, ...]], ...], list[int]] = {}
        values = []
        for index, item in enumerate(items):
            arrays = self._item_arrays(item)
            key = tuple((name, array.shape) for name, array in arrays.items())
            groups.setdefault(key, []).append(index)
            values.append(arrays)
        pieces = []
        for indices in groups.values():
            names = values[indices[0]]
            stacked = {name: np.stack([values[i][name] for i in indices]) for name in names}
            pieces.append((indices, self._run(stacked, len(indices))))
        return self._answers(pieces, len(items))

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "url": self.url,
            "model": self.model,
            "model_version": self.model_version,
            "versions": self.versions,
            "protocol": self.protocol,
            "max_batch_size": self.max_batch_size,
            "platform": self.platform,
        }
        optional = [t.spec.to_dict() for t in self._inputs if t.optional]
        if optional:
            described["optional_inputs"] = optional
        return described

    def close(self) -> None:
        """Close this process's connection to the server (a worker's closes when it exits)."""
        if self._client is not None and self._client_pid == os.getpid():
            self._client.close()
        self._client = None
        self._client_pid = -1

    # -- talking to the server ----------------------------------------------------------------

    def _connect(self, timeout_s: float | None = None) -> Any:
        if self.protocol == "grpc":
            return self._client_module.InferenceServerClient(self.url)  # timeouts per call
        timeout_s = timeout_s or self.timeout_s
        return self._client_module.InferenceServerClient(
            self.url, connection_timeout=timeout_s, network_timeout=timeout_s
        )

    def _call(self, method: Any, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)``, gRPC's with its timeout (HTTP's client has its own)
        and asking for JSON, which is what HTTP answers."""
        if self.protocol == "grpc":
            kwargs["client_timeout"] = timeout_s or self.timeout_s
            if method.__name__.startswith("get_model_"):
                kwargs["as_json"] = True
        return method(*args, **kwargs)

    def _client_here(self) -> Any:
        """The client of this process, opened on its first batch (see the constructor)."""
        if self._client_pid != os.getpid():
            self._client = self._connect()
            self._client_pid = os.getpid()
        return self._client

    def _wait_until_ready(self, client: Any, timeout_s: float) -> None:
        """Return once the model is ready; raise :class:`TritonError` when it will not be."""
        deadline = time.monotonic() + timeout_s
        why = "no answer yet"
        while True:
            probe_s = max(min(self.timeout_s, deadline - time.monotonic()), 0.1)
            hopeless = None
            try:
                if self._call(
                    client.is_model_ready, self.model, self.model_version, timeout_s=probe_s
                ):
                    return
                why, hopeless = self._why_not_ready(client, probe_s)
            except Exception as exc:  # refused, reset, timed out (gevent's are not OSErrors)
                why = f"cannot reach the server ({type(exc).__name__}: {exc})"
            if hopeless is not None:
                raise TritonError(f"{self.label}: {hopeless}")
            if time.monotonic() >= deadline:
                raise TritonError(f"{self.label} is not ready after {timeout_s:g} s: {why}")
            time.sleep(min(_POLL_S, max(deadline - time.monotonic(), 0)))

    def _why_not_ready(self, client: Any, timeout_s: float) -> tuple[str, str | None]:
        """Why a reachable server's model is not ready, and whether waiting is hopeless (the
        repository has no such model, or it failed to load), from the repository index.

        A server's own readiness says nothing here: one in explicit model control mode (as
        PyTriton runs it) is ready before it loads its models. When the index is restricted,
        or empty (PyTriton loads its models from elsewhere), there is no telling: wait.
        """
        unknown = "the server does not say why (no such model, or it is not loaded yet)"
        try:
            index = self._call(client.get_model_repository_index, timeout_s=timeout_s)
        except self._server_error:
            return unknown, None
        if isinstance(index, Mapping):
            index = index.get("models", [])  # gRPC's JSON wraps the list; HTTP's does not
        if not index:
            return unknown, None
        entries = [e for e in index if e.get("name") == self.model]
        if not entries:
            names = sorted({str(e.get("name")) for e in index})
            return "", f"the server has no such model (it has: {', '.join(names) or 'none'})"
        if self.model_version:
            entries = [e for e in entries if str(e.get("version", "")) in ("", self.model_version)]
        for entry in entries:
            reason = str(entry.get("reason") or "")
            if entry.get("state") == "UNAVAILABLE" and reason and reason != "unloaded":
                return "", f"the model failed to load on the server: {reason}"
        states = sorted({str(e.get("state") or "not loaded") for e in entries}) or ["not loaded"]
        return f"the model is {' / '.join(states)} on the server", None

    def _infer(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call to the server; the outputs by name."""
        module = self._client_module
        inputs = []
        for name, array in arrays.items():
            tensor = self._by_name[name]
            infer_input = module.InferInput(name, list(array.shape), tensor.triton_datatype)
            infer_input.set_data_from_numpy(array.astype(tensor.wire_dtype, copy=False))
            inputs.append(infer_input)
        client = self._client_here()
        try:
            result = self._call(
                client.infer,
                self.model,
                inputs,
                model_version=self.model_version,
                outputs=self._requested,
            )
        except self._server_error as exc:
            status = getattr(exc, "status", lambda: None)()  # "400" or a gRPC StatusCode
            if str(status) in _BAD_REQUEST:
                raise BatchInputError(f"{self.label} refused the inputs: {exc}") from None
            raise TritonError(f"{self.label}: {exc}") from None
        except Exception as exc:
            raise TritonError(f"{self.label}: {type(exc).__name__}: {exc}") from None
        outputs = {}
        for tensor in self._outputs:
            array = result.as_numpy(tensor.spec.name)
            if array is None:
                raise TritonError(f"{self.label} answered without output {tensor.spec.name!r}")
            outputs[tensor.spec.name] = _readable(tensor, array)
        return outputs

    def _run(self, arrays: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
        """The outputs for ``size`` stacked items, batch axis first, in as many calls as the
        model's ``max_batch_size`` needs."""
        if self.max_batch_size == 0:
            # The model takes no batch axis: one call per item, its outputs given one.
            calls = [self._infer({k: a[i] for k, a in arrays.items()}) for i in range(size)]
            parts = [{k: a[np.newaxis] for k, a in call.items()} for call in calls]
        else:
            step = self.max_batch_size
            parts = [
                self._infer({k: a[start : start + step] for k, a in arrays.items()})
                for start in range(0, size, step)
            ]
        if len(parts) == 1:
            return parts[0]
        return {name: _joined([part[name] for part in parts]) for name in parts[0]}

    # -- items in, answers out ------------------------------------------------------------------

    def _item_arrays(self, item: Any) -> dict[str, np.ndarray]:
        """One request input as an array per input tensor, checked; or a BatchInputError."""
        if isinstance(item, Mapping):
            unknown = sorted(set(item) - set(self._by_name))
            missing = sorted(self._required - set(item))
            if unknown or missing:
                problems = []
                if missing:
                    problems.append(f"no {', '.join(missing)}")
                if unknown:
                    problems.append(f"unknown {', '.join(map(str, unknown))}")
                raise BatchInputError(
                    f"{self.label} takes inputs {{{self._names()}}}; got {' and '.join(problems)}"
                )
            return {
                t.spec.name: self._array(t, item[t.spec.name])
                for t in self._inputs
                if t.spec.name in item
            }
        if self._bare is None:
            raise BatchInputError(
                f"{self.label} takes several inputs: send each input as {{{self._names()}}}"
            )
        return {self._bare.spec.name: self._array(self._bare, item)}

    def _names(self) -> str:
        return ", ".join(
            f'"{t.spec.name}": {t.spec.type_name()}' + (" (optional)" if t.optional else "")
            for t in self._inputs
        )

    def _array(self, tensor: _Tensor, value: Any) -> np.ndarray:
        spec = tensor.spec
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise self._refused(tensor, f"values that are not one array ({exc})") from None
        if tensor.is_bytes:
            if array.dtype.kind not in "US":
                raise self._refused(tensor, f"{array.dtype.name} values, not strings")
            array = array.astype(object)
        elif array.size:
            target = tensor.check_dtype
            # JSON integers parse as int64 whatever the tensor: any integer fits an integer
            # tensor within its range (checked next), but floats do not, nor numbers a BOOL.
            if array.dtype.kind not in _FITS[target.kind]:
                got = "strings" if array.dtype.kind in "US" else f"{array.dtype.name} values"
                raise self._refused(tensor, got)
            if target.kind in "iu" and (
                array.min() < np.iinfo(target).min or array.max() > np.iinfo(target).max
            ):
                raise self._refused(tensor, f"values outside {target.name}'s range")
        if not spec.accepts(array.shape):
            raise self._refused(tensor, f"shape [{', '.join(map(str, array.shape))}]")
        return array if tensor.is_bytes else array.astype(tensor.check_dtype, copy=False)

    def _refused(self, tensor: _Tensor, got: str) -> BatchInputError:
        return BatchInputError(
            f"{self.label} takes inputs of {tensor.spec.describe()} each, got {got}"
        )

    def _answers(self, pieces: list[tuple[list[int], dict[str, np.ndarray]]], size: int) -> Outputs:
        """One answer per item, in the batch's order, from each group's outputs."""
        columns: dict[str, np.ndarray | list[np.ndarray]] = {}
        order = [index for indices, _ in pieces for index in indices]
        for tensor in self._outputs:
            name = tensor.spec.name
            arrays = [outputs[name] for _, outputs in pieces]
            if len(arrays) == 1:
                columns[name] = arrays[0]  # one group: the whole batch, in order
            elif len({a.shape[1:] for a in arrays}) == 1:
                columns[name] = np.concatenate(arrays)[np.argsort(order)]
            else:
                rows: list[np.ndarray] = [np.empty(0)] * size  # shapes differ between groups
                for index, row in zip(order, (r for a in arrays for r in a), strict=True):
                    rows[index] = row
                columns[name] = rows
        if len(self._outputs) == 1:
            column = columns[self._outputs[0].spec.name]
            if isinstance(column, np.ndarray) and column.dtype != object:
                return column  # numbers: sent to the gateway as one buffer
            return [_plain(row) for row in column]
        return [{name: _plain(column[i]) for name, column in columns.items()} for i in range(size)]

    def _tensor(self, entry: Mapping[str, Any], optional: set[str], utils: Any) -> _Tensor:
        name = str(entry["name"])
        datatype = str(entry["datatype"])
        if datatype not in DATATYPES:
            raise TritonError(
                f"{self.label}: tensor {name!r} has datatype {datatype}, which "
                f"ketch does not handle (it takes {', '.join(DATATYPES)})"
            )
        shape = tuple(int(d) for d in entry["shape"])  # gRPC's JSON gives sizes as strings
        if self.max_batch_size > 0:
            shape = shape[1:]  # Triton's batch dimension; ketch's items have none
        wire = np.dtype(utils.triton_to_np_dtype(datatype))
        check = np.dtype(np.float32) if datatype == "BF16" else wire
        spec = TensorSpec(name, DATATYPES[datatype], shape)
        return _Tensor(spec, datatype, check, wire, name in optional)


def _parse_address(artifact: str) -> dict[str, str]:
    """``[SCHEME://]HOST:PORT/MODEL[/VERSION]`` as options."""
    match = _ADDRESS.match(artifact)
    if match is None:
        raise ValueError(
            f"{artifact!r} is not [http://|grpc://]HOST:PORT/MODEL[/VERSION] "
            "(for example localhost:8000/resnet50)"
        )
    parts = {key: value for key, value in match.groupdict().items() if value is not None}
    if parts.get("protocol", "http") not in PROTOCOLS:
        raise ValueError(f"{artifact!r}: the scheme must be http:// or grpc://")
    return parts


def _checked_version(version: Any) -> str:
    if version in ("", None):
        return ""
    if isinstance(version, int) and not isinstance(version, bool) and version > 0:
        return str(version)
    if isinstance(version, str) and version.isdigit() and int(version) > 0:
        return str(int(version))
    raise ValueError(f"model_version must be a version number or '' (latest), got {version!r}")


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """Several calls' outputs as one batch (an object array of rows when their shapes differ,
    which a variable output dimension allows)."""
    if len({a.shape[1:] for a in arrays}) == 1:
        return np.concatenate(arrays)
    joined = np.empty(sum(len(a) for a in arrays), dtype=object)
    for index, row in enumerate(row for a in arrays for row in a):
        joined[index] = row  # one by one: a slice assignment would broadcast the rows
    return joined


def _readable(tensor: _Tensor, array: np.ndarray) -> np.ndarray:
    """An output as ketch sends it: strings for BYTES, float32 for BF16 (not msgpack-able)."""
    if tensor.is_bytes:
        flat = [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.ravel()
        ]
        decoded = np.empty(array.shape, dtype=object)
        decoded.ravel()[:] = flat
        return decoded
    if tensor.triton_datatype == "BF16":
        return array.astype(np.float32)
    return array


def _plain(row: Any) -> Any:
    return row.tolist() if isinstance(row, np.ndarray | np.generic) else row


@hookimpl
def ketch_register_runtimes(register: RegisterRuntime) -> None:
    register("triton", TritonRuntime)
