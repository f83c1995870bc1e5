"""``@ketch.model``: turn a batch function into a servable model.

A model function takes a batch (a list, or a numpy array when its first parameter is annotated
``np.ndarray``) and returns a sequence of the same length. The decorator validates its options
when it decorates, so a typo fails at import time instead of at the first request, and returns a
:class:`Model` that is still callable as the plain function.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Literal, ParamSpec, TypeVar, overload

import msgspec
from msgspec.structs import replace

from ketch.specs.function_hints import BatchInput as BatchInput  # its home, re-exported
from ketch.specs.function_hints import (
    batch_input_of,
    declared_tensors,
    hinted_tensors,
    require_batch_parameter,
    takes_params,
)
from ketch.specs.resources import Resources
from ketch.specs.signature import TensorSpec

P = ParamSpec("P")
R = TypeVar("R")


#: Names and versions appear in URLs and log lines: keep them to URL-safe characters.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
DEFAULT_VERSION = "1"
DEFAULT_MAX_BATCH_SIZE = 32
#: Inputs a model's queue holds before new requests get 429: enough for bursts, small enough
#: that an overloaded gateway's memory stays bounded.
DEFAULT_MAX_QUEUE = 4096
#: A sequence idle this long is ended. Triton's default is 1 s, which a client that thinks
#: between steps (a chat, a person) outlives; a minute still frees a worker soon.
DEFAULT_SEQUENCE_IDLE_TIMEOUT_S = 60.0
_CACHE_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*$", re.IGNORECASE)
_BYTE_UNITS = {"k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


class PoolSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How many workers a model version gets, and when.

    :param min_replicas: workers kept even without traffic; 0 lets the pool scale to zero.
    :param max_replicas: most workers the pool grows to under load.
    :param idle_timeout_s: how long the pool must have more workers than its load needs
        before it stops one (and, at ``min_replicas=0``, how long without traffic before it is
        back to zero). The delay is the hysteresis that keeps pools from flapping.
    :param target_inflight: requests queued or computing per worker that the pool aims for;
        more than that starts another worker.
    :param cold_start_timeout_s: how long a request waits for a worker to start before it is
        answered 503.
    """

    min_replicas: int = 0
    max_replicas: int = 1
    idle_timeout_s: float = 300.0
    target_inflight: int = 64
    cold_start_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for field_name in ("min_replicas", "max_replicas", "target_inflight"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{field_name} must be an int, got {value!r}")
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(
                f"max_replicas must be >= 1 and >= min_replicas ({self.min_replicas}), "
                f"got {self.max_replicas}"
            )
        if self.target_inflight < 1:
            raise ValueError(f"target_inflight must be >= 1, got {self.target_inflight}")
        for field_name in ("idle_timeout_s", "cold_start_timeout_s"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{field_name} must be a number of seconds > 0, got {value!r}")

    def with_floor(self, replicas: int) -> PoolSpec:
        """This spec with at least ``replicas`` workers kept (``ketch serve --min-replicas``)."""
        if replicas <= self.min_replicas:
            return self
        return replace(self, min_replicas=replicas, max_replicas=max(self.max_replicas, replicas))


class Placement(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where a model's workers may run when Ray places them (``ketch serve --placement ray``).

    :param resources: Ray custom resources each worker needs beyond its CPUs, GPUs and memory
        (``{"accelerator_v2": 1}``): Ray starts it on a node that has them.
    :param strategy: ``spread`` puts the model's replicas on as many nodes as Ray can, so that
        a node's loss takes the fewest of them (Ray's ``SPREAD``); ``pack`` fills a node
        before the next (Ray's default scheduling), leaving whole nodes free for others.
    """

    resources: dict[str, float] = msgspec.field(default_factory=dict)
    strategy: Literal["spread", "pack"] = "spread"

    def __post_init__(self) -> None:
        for name, amount in self.resources.items():
            if not name or not _is_number(amount) or not amount > 0:
                raise ValueError(f"resources must map names to amounts > 0 ({name!r}: {amount!r})")


class WorkerStart(msgspec.Struct, frozen=True, kw_only=True):
    """How a model's worker processes start.

    :param preload: keep a template process with the model's module imported, even while the
        pool is at zero, and fork each worker from it: a cold start then skips the model's own
        imports (seconds for ``import torch``), at the cost of the template's memory.
    :param python: the interpreter that runs the workers (e.g. the model's virtualenv's
        ``bin/python``, or a name looked up on ``PATH``); ketch must be installed there.
        ``None`` uses the gateway's interpreter.
    :param env: the environment the workers run in, which the server builds with uv (once
        per content, cached): requirement lines (``["scikit-learn==1.5.2"]``, any line of a
        requirements file), or the path of a requirements file or of a ``uv.lock`` with its
        ``pyproject.toml`` beside it (relative to the declaring file). Once built, ``python``
        is the environment's interpreter. Written as a literal, since the server reads it
        before the module's imports can resolve. See ``docs/deploying.md``.
    :param placement: what Ray must find on a node to start a worker there (custom
        resources), with ``--placement ray``; see ``docs/cluster.md``.
    """

    preload: bool = False
    python: str | None = None
    env: tuple[str, ...] | str | None = None
    placement: Placement = msgspec.field(default_factory=Placement)

    def __post_init__(self) -> None:
        if not isinstance(self.preload, bool):
            raise TypeError(f"preload must be True or False, got {self.preload!r}")
        if self.python is not None and (not isinstance(self.python, str) or not self.python):
            raise ValueError(f"python must name an interpreter, got {self.python!r}")
        env = self.env
        if isinstance(env, tuple):
            if not env or not all(isinstance(line, str) and line.strip() for line in env):
                raise TypeError(f"env must be requirement lines (strings), got {env!r}")
        elif env is not None and (not isinstance(env, str) or not env.strip()):
            raise TypeError(
                f"env must be requirement lines or the path of a requirements file or uv.lock, "
                f"got {env!r}"
            )


def declared_start(
    preload: bool, python: str | None, env: Any, placement: Any = None
) -> WorkerStart:
    """How a declaration's workers start: ``python=`` names an interpreter, ``env=`` one
    the server builds, so a declaration gives at most one of them; ``placement``, a map
    (``{"resources": {...}, "strategy": "spread"}``), says where Ray may place them."""
    if python is not None and env is not None:
        raise ValueError("give python= (an interpreter) or env= (an environment), not both")
    if isinstance(env, list | tuple):
        env = tuple(line.strip() for line in env if isinstance(line, str) and line.strip())
        if not env:
            raise TypeError("env must hold at least one requirement line")
    where = Placement()
    if placement is not None:
        try:
            where = msgspec.convert(placement, Placement)
        except msgspec.ValidationError as exc:
            raise ValueError(
                'placement must be {"resources": {name: amount}, "strategy": "spread" or '
                f'"pack"}}: {exc}, got {placement!r}'
            ) from None
    return WorkerStart(preload=preload, python=python, env=env, placement=where)


def plain_data(shape: msgspec.Struct) -> dict[str, Any]:
    """A Struct as plain JSON data: maps, lists (no tuples), strings, numbers, booleans."""
    data: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(shape))
    return data


_TENSOR_FIELDS = ("inputs", "outputs", "hinted_inputs", "hinted_outputs")


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway needs to know about a model: plain data, the one shape of a model in
    the served file's discovery, in a worker's READY, in a plan and in the management API.

    :param name: URL name of the model (``/models/{name}/predict``).
    :param version: version label; requests without a version go to the highest one.
    :param max_batch_size: most inputs handed to one call of the function; 0 for a model
        without a batch axis (one input per call, V2 tensors taken whole).
    :param batch_input: ``"list"`` or ``"numpy"`` (inputs stacked into one array).
    :param max_delay_ms: longest a request waits for others to fill its batch (0: a free
        worker gets what is waiting at once).
    :param slo_ms: latency objective: each worker's batch size adapts to meet it, and it is
        every request's deadline unless the request sets its own.
    :param max_queue: inputs waiting for a worker beyond which requests are answered 429.
    :param cache_size: prediction cache, off by default: a number of entries, or a size in
        bytes as text (``"64MB"``, ``"1GiB"``).
    :param stall_timeout_s: a batch a worker holds longer than this is retried on another
        worker (and a worker that keeps stalling is dropped); None derives it from the batch
        times the queue observed.
    :param is_async: whether the function is ``async def``.
    :param takes_params: whether the function takes each item's request parameters as a
        second argument, ``params`` (a list of dicts, one per item); a request with parameters
        to a model that does not is a 400.
    :param sequence: a stateful model (Triton's sequence batcher): every request of one
        ``sequence_id`` goes to the same worker, one at a time and in order, and the model
        sees ``sequence_id``, ``sequence_start`` and ``sequence_end`` in each item's params.
    :param sequence_idle_timeout_s: a sequence with no request for this long is ended (its
        next request must start it again).
    :param pool: how many workers serve it, and when.
    :param resources: what each worker may use (cores, memory, threads, GPUs).
    :param start: how its workers start (a preloaded template, another interpreter).
    :param runtime: the runtime that loads it in the worker: ``"python"`` for a decorated
        function, a framework adapter's name (``"torch"``) for a deployed artifact.
    :param artifact: the deployed model's path (absolute), or None.
    :param options: the runtime's options (``{"device": "cpu"}``).
    :param inputs, outputs: its tensors per item: declared with ``@ketch.model(inputs=...)``,
        or as its worker's runtime announced them (empty until a worker has loaded it, or when
        the runtime cannot tell). Requests are checked against its inputs.
    :param hinted_inputs, hinted_outputs: tensors guessed from the function's type hints
        (``list[float]``: one float64 per item), shown in the V2 model metadata when nothing
        was declared or announced, and never enforced: a hint is not a contract.
    :param runtime_info: what the runtime says of the loaded model (``Runtime.describe()``),
        as its worker announced it.
    """

    name: str
    version: str = DEFAULT_VERSION
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_input: BatchInput = "list"
    is_async: bool = False
    takes_params: bool = False
    max_delay_ms: float = 0.0
    slo_ms: float | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    cache_size: int | str | None = None
    stall_timeout_s: float | None = None
    sequence: bool = False
    sequence_idle_timeout_s: float = DEFAULT_SEQUENCE_IDLE_TIMEOUT_S
    pool: PoolSpec = msgspec.field(default_factory=PoolSpec)
    resources: Resources = msgspec.field(default_factory=Resources)
    start: WorkerStart = msgspec.field(default_factory=WorkerStart)
    runtime: str = "python"
    artifact: str | None = None
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    runtime_info: dict[str, Any] = msgspec.field(default_factory=dict)
    hinted_inputs: tuple[TensorSpec, ...] = ()
    hinted_outputs: tuple[TensorSpec, ...] = ()

    @property
    def deployed(self) -> bool:
        """Loaded by a runtime from an artifact rather than defined by a decorated function."""
        return self.runtime != "python" or self.artifact is not None

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.version)

    @property
    def has_batch_axis(self) -> bool:
        """Whether a V2 tensor's first dimension is the batch (Triton's max_batch_size > 0)."""
        return self.max_batch_size > 0

    @property
    def batch_limit(self) -> int:
        """The most inputs one call gets."""
        return max(self.max_batch_size, 1)

    def label(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (maps, lists, strings, numbers) for JSON or msgpack."""
        return plain_data(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Rebuild a spec from :meth:`to_dict`, ignoring keys a newer peer may add; raises
        ``ValueError`` naming the field and the value when one is not valid."""
        known = {name: data[name] for name in cls.__struct_fields__ if name in data}
        for name, part in _PARTS.items():
            if name in known:
                known[name] = msgspec.convert(known[name], part)
        # The scalar fields go through the same checks, and messages, as the decorator's.
        return validated_spec(**known)


#: The fields of a :class:`ModelSpec` that are shapes of their own.
_PARTS: dict[str, Any] = {
    "pool": PoolSpec,
    "resources": Resources,
    "start": WorkerStart,
    **{name: tuple[TensorSpec, ...] for name in _TENSOR_FIELDS},
}


def validated_spec(
    name: str,
    version: str | int = DEFAULT_VERSION,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batch_input: BatchInput = "list",
    is_async: bool = False,
    takes_params: bool = False,
    max_delay_ms: float = 0.0,
    slo_ms: float | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    cache_size: int | str | None = None,
    stall_timeout_s: float | None = None,
    sequence: bool = False,
    sequence_idle_timeout_s: float = DEFAULT_SEQUENCE_IDLE_TIMEOUT_S,
    pool: PoolSpec | None = None,
    resources: Resources | None = None,
    start: WorkerStart | None = None,
    runtime: str = "python",
    artifact: str | None = None,
    options: Mapping[str, Any] | None = None,
    inputs: Sequence[TensorSpec] = (),
    outputs: Sequence[TensorSpec] = (),
    runtime_info: Mapping[str, Any] | None = None,
    hinted_inputs: Sequence[TensorSpec] = (),
    hinted_outputs: Sequence[TensorSpec] = (),
) -> ModelSpec:
    """Build a :class:`ModelSpec`, raising ``ValueError``/``TypeError`` that names the bad value."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(
            f"model name {name!r} is not valid: use 1-128 letters, digits, '_', '.' or '-'"
        )
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str) or not NAME_PATTERN.match(version):
        raise ValueError(
            f"model version {version!r} of {name!r} is not valid: "
            "use 1-128 letters, digits, '_', '.' or '-'"
        )
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
        raise TypeError(f"max_batch_size of {name!r} must be an int, got {max_batch_size!r}")
    if max_batch_size < 0:
        raise ValueError(
            f"max_batch_size of {name!r} must be >= 1, or 0 for a model without a batch axis, "
            f"got {max_batch_size}"
        )
    if batch_input not in ("list", "numpy"):
        raise ValueError(f"batch_input of {name!r} must be 'list' or 'numpy', got {batch_input!r}")
    if not _is_number(max_delay_ms) or not max_delay_ms >= 0:
        raise ValueError(f"max_delay_ms of {name!r} must be a number >= 0, got {max_delay_ms!r}")
    if slo_ms is not None and (not _is_number(slo_ms) or not slo_ms > max_delay_ms):
        raise ValueError(
            f"slo_ms of {name!r} must be a number of milliseconds above max_delay_ms "
            f"({max_delay_ms:g}), got {slo_ms!r}"
        )
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
        raise ValueError(f"max_queue of {name!r} must be an int >= 1, got {max_queue!r}")
    cache_limit(cache_size, name)
    if stall_timeout_s is not None and (not _is_number(stall_timeout_s) or not stall_timeout_s > 0):
        raise ValueError(
            f"stall_timeout_s of {name!r} must be a number of seconds > 0, got {stall_timeout_s!r}"
        )
    if not isinstance(sequence, bool):
        raise TypeError(f"sequence of {name!r} must be True or False, got {sequence!r}")
    if sequence and not takes_params:
        raise ValueError(
            f"model {name!r} is a sequence model, so its function must take a second "
            "argument, params: that is where it finds each item's sequence_id and flags"
        )
    if not _is_number(sequence_idle_timeout_s) or not sequence_idle_timeout_s > 0:
        raise ValueError(
            f"sequence_idle_timeout_s of {name!r} must be a number of seconds > 0, "
            f"got {sequence_idle_timeout_s!r}"
        )
    return ModelSpec(
        name=name,
        version=version,
        max_batch_size=max_batch_size,
        batch_input=batch_input,
        is_async=bool(is_async),
        takes_params=bool(takes_params),
        max_delay_ms=float(max_delay_ms),
        slo_ms=float(slo_ms) if slo_ms is not None else None,
        max_queue=max_queue,
        cache_size=cache_size,
        stall_timeout_s=float(stall_timeout_s) if stall_timeout_s is not None else None,
        sequence=sequence,
        sequence_idle_timeout_s=float(sequence_idle_timeout_s),
        pool=pool or PoolSpec(),
        resources=resources or Resources(),
        start=start or WorkerStart(),
        runtime=runtime,
        artifact=artifact,
        options=dict(options or {}),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        runtime_info=dict(runtime_info or {}),
        hinted_inputs=tuple(hinted_inputs),
        hinted_outputs=tuple(hinted_outputs),
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def cache_limit(cache_size: int | str | None, name: str) -> tuple[str, int] | None:
    """``("entries", n)`` or ``("bytes", n)`` for a ``cache_size``; None when caching is off.

    Raises ``ValueError`` naming the model and the value when it is neither.
    """
    if cache_size is None:
        return None
    if isinstance(cache_size, int) and not isinstance(cache_size, bool) and cache_size >= 1:
        return ("entries", cache_size)
    if isinstance(cache_size, str) and (match := _CACHE_BYTES.match(cache_size)):
        amount, unit = match.groups()
        size = int(float(amount) * _BYTE_UNITS[unit[:-1].lower()])
        if size >= 1:
            return ("bytes", size)
    raise ValueError(
        f"cache_size of {name!r} must be a number of entries >= 1 or a size like '64MB', "
        f"got {cache_size!r}"
    )


class Model(Generic[P, R]):
    """A decorated model function: call it like the function, serve it with ``ketch serve``."""

    def __init__(self, fn: Callable[P, R], spec: ModelSpec) -> None:
        self.fn = fn
        self.spec = spec
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<ketch.Model {self.spec.label()} of {self.fn.__module__}.{self.fn.__qualname__}>"


@overload
def model(fn: Callable[P, R], /) -> Model[P, R]: ...


@overload
def model(
    *,
    name: str | None = None,
    version: str | int = DEFAULT_VERSION,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_delay_ms: float = 0.0,
    slo_ms: float | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    cache_size: int | str | None = None,
    stall_timeout_s: float | None = None,
    sequence: bool = False,
    sequence_idle_timeout_s: float = DEFAULT_SEQUENCE_IDLE_TIMEOUT_S,
    min_replicas: int = 0,
    max_replicas: int = 1,
    idle_timeout_s: float = 300.0,
    target_inflight: int = 64,
    cold_start_timeout_s: float = 60.0,
    cpus: Sequence[int] | None = None,
    memory_mb: int | None = None,
    threads: int | None = None,
    gpus: Sequence[int] | None = None,
    preload: bool = False,
    python: str | None = None,
    env: Sequence[str] | str | None = None,
    placement: Mapping[str, Any] | None = None,
    inputs: Sequence[TensorSpec] | None = None,
    outputs: Sequence[TensorSpec] | None = None,
) -> Callable[[Callable[P, R]], Model[P, R]]: ...


def model(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    version: str | int = DEFAULT_VERSION,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_delay_ms: float = 0.0,
    slo_ms: float | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    cache_size: int | str | None = None,
    stall_timeout_s: float | None = None,
    sequence: bool = False,
    sequence_idle_timeout_s: float = DEFAULT_SEQUENCE_IDLE_TIMEOUT_S,
    min_replicas: int = 0,
    max_replicas: int = 1,
    idle_timeout_s: float = 300.0,
    target_inflight: int = 64,
    cold_start_timeout_s: float = 60.0,
    cpus: Sequence[int] | None = None,
    memory_mb: int | None = None,
    threads: int | None = None,
    gpus: Sequence[int] | None = None,
    preload: bool = False,
    python: str | None = None,
    env: Sequence[str] | str | None = None,
    placement: Mapping[str, Any] | None = None,
    inputs: Sequence[TensorSpec] | None = None,
    outputs: Sequence[TensorSpec] | None = None,
) -> Model[P, R] | Callable[[Callable[P, R]], Model[P, R]]:
    """Declare a model: ``@ketch.model`` or ``@ketch.model(name=..., version=..., ...)``.

    :param name: the model's URL name; defaults to the function's name.
    :param version: version label (default ``"1"``).
    :param max_batch_size: most inputs passed to one call of the function (default 32); 0, as
        in Triton, for a model without a batch axis: a V2 request's tensors are then one input
        whole (not cut along their first dimension), and each call gets a batch of one.
    :param max_delay_ms, slo_ms, max_queue, cache_size, stall_timeout_s: batching, deadlines,
        backpressure, the prediction cache and stalled batches, see :class:`ModelSpec`.
    :param sequence, sequence_idle_timeout_s: a stateful model whose requests come in
        sequences (``sequence_id``), each kept on one worker, see :class:`ModelSpec` and
        ``docs/protocols.md``; its function takes ``params``.
    :param min_replicas, max_replicas, idle_timeout_s, target_inflight, cold_start_timeout_s:
        the model's worker pool, see :class:`PoolSpec`. By default a model has no worker
        until its first request, one while it has traffic, and none again after 5 idle
        minutes.
    :param cpus, memory_mb, threads, gpus: what each worker may use, see :class:`Resources`.
    :param preload, python, env, placement: how its workers start, in which environment, and
        where Ray may place them (``{"resources": {"accelerator_v2": 1}}``), see
        :class:`WorkerStart`.
    :param inputs, outputs: the model's tensors, per item (:class:`TensorSpec`, shapes without
        the batch axis): requests are checked against the inputs (a 400 naming the expected
        tensor), and the Open Inference Protocol's metadata lists them. A model with several
        inputs receives each item as ``{name: value}``. Without them, the metadata shows what
        the type hints say, if they are plain enough (``list[float]``, ``list[str]``,
        ``list[list[int]]``), unenforced.

    The function receives a batch and must return one output per input. Annotate its first
    parameter ``np.ndarray`` to receive the batch as one stacked array.
    """

    pool = PoolSpec(
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        idle_timeout_s=idle_timeout_s,
        target_inflight=target_inflight,
        cold_start_timeout_s=cold_start_timeout_s,
    )
    resources = Resources(
        cpus=tuple(cpus) if cpus is not None else None,
        memory_mb=memory_mb,
        threads=threads,
        gpus=tuple(gpus) if gpus is not None else None,
    )
    start = declared_start(preload, python, env, placement)

    def decorate(func: Callable[P, R]) -> Model[P, R]:
        if isinstance(func, Model):
            raise TypeError(f"{func!r} is already a ketch model; decorate the function once")
        if not callable(func):
            raise TypeError(f"@ketch.model decorates a function, got {func!r}")
        require_batch_parameter(func)
        model_name = name if name is not None else func.__name__
        batch_input = batch_input_of(func)
        declared_inputs = declared_tensors(inputs, "inputs", model_name)
        if batch_input == "numpy" and len(declared_inputs) > 1:
            raise ValueError(
                f"model {model_name!r} takes its batch as one numpy array, so it has one input "
                f"tensor, not {len(declared_inputs)}; annotate it list[dict] for named inputs"
            )
        hinted_inputs, hinted_outputs = hinted_tensors(func)
        spec = validated_spec(
            name=model_name,
            version=version,
            max_batch_size=max_batch_size,
            max_delay_ms=max_delay_ms,
            slo_ms=slo_ms,
            max_queue=max_queue,
            cache_size=cache_size,
            stall_timeout_s=stall_timeout_s,
            sequence=sequence,
            sequence_idle_timeout_s=sequence_idle_timeout_s,
            batch_input=batch_input,
            is_async=inspect.iscoroutinefunction(func),
            takes_params=takes_params(func),
            pool=pool,
            resources=resources,
            start=start,
            inputs=declared_inputs,
            outputs=declared_tensors(outputs, "outputs", model_name),
            hinted_inputs=hinted_inputs,
            hinted_outputs=hinted_outputs,
        )
        return Model(func, spec)

    if fn is not None:
        return decorate(fn)
    return decorate
