"""The ketch worker protocol, version 2: the one place it is defined.

Transport
    ZeroMQ. The gateway's broker binds a ROUTER socket (``tcp://127.0.0.1:7070`` by default,
    ``--broker`` to change it); every worker connects a DEALER to it, so a worker on another
    machine joins exactly as a local one does. One worker process serves one model version.

Frames
    A worker sends ``[head, *buffers]``; the broker receives the same behind the routing
    identity ZeroMQ adds, ``[identity, head, *buffers]``, and replies with that identity in
    front. ``head`` is ``PROTOCOL + command + header`` in one frame: every frame is a send
    and a receive on each side, and a ping-pong of two frames instead of version 1's five
    took 20 µs less per round trip.

    * ``PROTOCOL`` is :data:`PROTOCOL` (``b"KETCH/2"``). A peer speaking another version is
      answered with DISCONNECT and otherwise ignored.
    * ``command`` is one byte, see :class:`Command`.
    * ``header`` is a msgpack map (the rest of the head). Numpy arrays anywhere inside it
      are msgpack extension values (type :data:`NDARRAY_EXT`) holding ``[buffer index,
      dtype string, shape]``; the array's bytes travel raw as ``buffers[index]``, one frame
      each, so no array is copied into the header and nothing is pickled. Numpy scalars
      travel as plain numbers. An array in POSIX shared memory that the worker can map too
      (READY's ``shm``) may instead be a value of type :data:`SHARED_EXT`, ``[object name,
      byte offset, dtype, shape]``, with no buffer: :mod:`ketch.zmq_transport.shared_arrays`.

Commands and their header fields (each command's header is a Struct below, :data:`HEADERS`;
:func:`read` checks a received header against it)
    ``READY`` (worker -> broker), once after the model is loaded:
        ``model`` (the model's spec as a map: the transport carries it, the core decodes it),
        ``pid``, ``host``, ``capacity`` (batches the worker accepts at once, at most
        :data:`MAX_CAPACITY`), ``heartbeat_ms`` (the worker's heartbeat interval, which the
        broker keeps to with this worker), ``shm`` (which ``/dev/shm`` it sees, if any). At
        most :data:`MAX_READY_BYTES` in all.
    ``REQUEST`` (broker -> worker): ``id`` (batch id, unique per broker), ``inputs`` (list, one
        entry per input in the batch).
    ``REPLY`` (worker -> broker): ``id``, ``outputs`` (list or array, one entry per input),
    ``compute_s`` (seconds the model took on the batch, which adaptive batching tunes by).
    ``ERROR`` (worker -> broker): ``id``, ``kind`` (:class:`ErrorKind`), ``type`` (exception
        class name), ``message``.
    ``HEARTBEAT`` (both ways): empty map. Each side sends one every ``heartbeat_ms``; any
        message counts as a sign of life. A peer silent for ``liveness`` intervals is dead (see
        :mod:`ketch.zmq_transport.liveness`).
    ``DISCONNECT`` (both ways): ``reason``, ``refused``. From the broker: stop sending to this
        broker (a worker started by ``ketch serve`` exits; one started by hand reconnects with
        backoff and sends READY again); ``refused`` when its READY was not admitted. From a
        worker: it is leaving; the broker retries its batches elsewhere.

Flow control
    The broker sends a worker at most ``capacity`` REQUESTs before their REPLY or ERROR. A
    worker that dies or goes silent with batches in flight has each batch retried once on
    another worker of the same model version; a batch that already had its retry fails.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, TypeAlias, TypeVar

import msgpack
import msgspec
import numpy as np

from ketch.zmq_transport.shared_arrays import SharedPlace, shared_place

PROTOCOL = b"KETCH/2"
NDARRAY_EXT = 1
SHARED_EXT = 2
#: Where the command byte and the header start in a message's head frame.
_COMMAND_AT = len(PROTOCOL)
_HEADER_AT = _COMMAND_AT + 1

Frame = bytes | memoryview
#: Frames from this size on (an array's bytes, as a flat uint8 buffer) travel without a copy.
ZERO_COPY_MIN_BYTES = 64 * 1024

#: One output per input of a batch: a list, or an array whose first axis is the batch.
Outputs: TypeAlias = "list[Any] | tuple[Any, ...] | np.ndarray[Any, Any]"
#: A worker's batch predict function: the inputs of one REQUEST to the outputs of its REPLY.
#: A batch's inputs and, for a model that takes them, each item's request parameters.
Predict: TypeAlias = Callable[[list[Any], list[dict[str, Any]] | None], Outputs]


class Command(bytes, enum.Enum):
    READY = b"\x01"
    REQUEST = b"\x02"
    REPLY = b"\x03"
    ERROR = b"\x04"
    HEARTBEAT = b"\x05"
    DISCONNECT = b"\x06"
    PEERS = b"\x07"


#: Each command by its byte: a dict lookup, where ``Command(byte)`` runs the enum machinery on
#: every message.
_COMMANDS: dict[bytes, Command] = {command.value: command for command in Command}


class ErrorKind(enum.StrEnum):
    """Why a batch failed, so the gateway can pick the HTTP status."""

    #: The model function raised.
    MODEL = "model"
    #: The model returned something other than one output per input, or an unsendable value.
    BAD_OUTPUT = "bad_output"
    #: The inputs could not be turned into the batch the model declared (e.g. ragged arrays).
    BAD_INPUT = "bad_input"


class BatchError(Exception):
    """Raised by a predict function for a batch it cannot compute through no fault of the model
    code: the worker answers ERROR with :attr:`kind` instead of :attr:`ErrorKind.MODEL`."""

    kind: ClassVar[ErrorKind]


class BatchInputError(BatchError):
    """The inputs cannot be made into the batch the model takes (HTTP 400)."""

    kind = ErrorKind.BAD_INPUT


class BatchOutputError(BatchError):
    """The model's return value is not one sendable output per input (HTTP 500)."""

    kind = ErrorKind.BAD_OUTPUT


class ProtocolError(ValueError):
    """A message that does not follow this protocol."""


# -- the header of each command, as msgspec Structs: what :func:`read` checks a header against.


#: Most batches a worker may ask to hold at once.
MAX_CAPACITY = 1024
#: Bounds of the heartbeat interval a worker may announce: faster would flood the broker,
#: slower would let a dead worker hold batches for minutes.
MIN_HEARTBEAT_MS = 10.0
MAX_HEARTBEAT_MS = 60_000.0
#: Most bytes of one READY (the model's spec with its tensors and what its runtime says).
MAX_READY_BYTES = 1024 * 1024


class Ready(msgspec.Struct, frozen=True, kw_only=True):
    model: dict[str, Any]
    pid: Annotated[int, msgspec.Meta(ge=0, le=2**31)]
    host: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    capacity: Annotated[int, msgspec.Meta(ge=1, le=MAX_CAPACITY)]
    heartbeat_ms: (
        Annotated[float, msgspec.Meta(ge=MIN_HEARTBEAT_MS, le=MAX_HEARTBEAT_MS)] | None
    ) = None
    #: Which ``/dev/shm`` the worker sees (:func:`~ketch.zmq_transport.shared_arrays.shm_identity`).
    shm: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    #: The id the gateway gave this process when it started it; None when started by hand.
    launch: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    #: The node of a cluster it was placed on (Ray's node id); None elsewhere.
    node: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None


class Request(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    #: One entry per input of the batch: a list, or an array whose first axis is the batch.
    inputs: Any
    #: Each input's request parameters, for a model that takes them; else None.
    params: list[dict[str, Any]] | None = None


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    outputs: Any
    compute_s: float | None = None


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    """The header of ERROR."""

    id: int
    kind: ErrorKind
    type: str
    message: str


class Beat(msgspec.Struct, frozen=True, kw_only=True):
    """The (empty) header of HEARTBEAT."""


class Disconnect(msgspec.Struct, frozen=True, kw_only=True):
    reason: str = ""
    #: From the broker: the worker's READY was refused (a model this gateway does not serve,
    #: tensors other than the declared ones): joining again as it is would be refused again.
    refused: bool = False


class PeerBroker(msgspec.Struct, frozen=True, kw_only=True):
    """Another gateway's broker: where it listens, and its CURVE public key (Z85; None for an
    insecure broker)."""

    endpoint: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    server_key: Annotated[str, msgspec.Meta(min_length=40, max_length=40)] | None = None


class Peers(msgspec.Struct, frozen=True, kw_only=True):
    """From a worker's first broker: the other gateways' brokers, which it joins as well, so
    that every gateway of a cluster can send it batches. The whole list each time: a broker
    no longer in it is left."""

    brokers: Annotated[list[PeerBroker], msgspec.Meta(max_length=64)] = []


#: The header shape of each command.
HEADERS: dict[Command, type[msgspec.Struct]] = {
    Command.READY: Ready,
    Command.REQUEST: Request,
    Command.REPLY: Reply,
    Command.ERROR: Failure,
    Command.HEARTBEAT: Beat,
    Command.DISCONNECT: Disconnect,
    Command.PEERS: Peers,
}
H = TypeVar("H", bound=msgspec.Struct)


def read(message: Message, shape: type[H]) -> H:
    """The header of ``message`` as its command's Struct; :class:`ProtocolError` naming the
    field when it does not fit."""
    if HEADERS[message.command] is not shape:
        raise ProtocolError(f"a {message.command.name} has no {shape.__name__} header")
    try:
        return msgspec.convert(message.header, shape)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"header of {message.command.name}: {exc}") from None


@dataclass(slots=True)
class Message:
    command: Command
    header: dict[str, Any] = field(default_factory=dict)


def encode(
    command: Command,
    header: msgspec.Struct | Mapping[str, Any] | None = None,
    *,
    by_reference: bool = False,
) -> list[Frame]:
    """Frames for one message, without envelope: ``[head, *buffers]``; the header is the
    command's Struct (or, for tests of malformed peers, a plain map). With ``by_reference``
    (a peer that sees this process's ``/dev/shm``), arrays in shared memory go by their place."""
    buffers: list[Frame] = []
    fields = msgspec.structs.asdict(header) if isinstance(header, msgspec.Struct) else header
    pack = functools.partial(_pack_extension, buffers, by_reference)
    packed = msgpack.packb(fields or {}, default=pack, use_bin_type=True)
    return [b"".join((PROTOCOL, command.value, packed)), *buffers]


def command_of(frames: Sequence[bytes]) -> Command | None:
    """The command of a message (envelope removed) without decoding its header; None when it
    is not a message of this protocol."""
    if not frames or frames[0][:_COMMAND_AT] != PROTOCOL:
        return None
    return _COMMANDS.get(frames[0][_COMMAND_AT:_HEADER_AT])


def worth_zero_copy(frames: Sequence[Frame]) -> bool:
    """Whether to hand ``frames`` to ZeroMQ without copying: only when one is large. Lending a
    buffer costs bookkeeping (pyzmq tracks when ZeroMQ is done with it), which for the small
    frames of a typical batch is dearer than the copy: a 60-byte round trip spent ~40 µs more
    CPU on each side lent than copied."""
    return any(len(frame) >= ZERO_COPY_MIN_BYTES for frame in frames)


def decode(frames: Sequence[bytes]) -> Message:
    """Parse ``[head, *buffers]`` (envelope already removed)."""
    if not frames:
        raise ProtocolError("a ketch message has at least 1 frame, got none")
    head, *buffers = frames
    if head[:_COMMAND_AT] != PROTOCOL:
        raise ProtocolError(
            f"peer speaks protocol {bytes(head[:_COMMAND_AT])[:16]!r}, "
            f"this side speaks {PROTOCOL!r}"
        )
    command = bytes(head[_COMMAND_AT:_HEADER_AT])
    cmd = _COMMANDS.get(command)
    if cmd is None:
        raise ProtocolError(f"unknown command byte {command!r}")
    try:
        header = msgpack.unpackb(
            memoryview(head)[_HEADER_AT:],
            ext_hook=functools.partial(_unpack_extension, buffers),
            raw=False,
            strict_map_key=False,
        )
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"header of {cmd.name} is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header of {cmd.name} must be a map, got {type(header).__name__}")
    return Message(cmd, header)


def split_envelope(frames: Sequence[bytes]) -> tuple[bytes, Sequence[bytes]]:
    """Split what a ROUTER receives into the peer identity and the message frames."""
    if len(frames) < 2:
        raise ProtocolError("message lacks the [identity, head] envelope")
    return frames[0], frames[1:]


def _pack_extension(buffers: list[Frame], by_reference: bool, value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            return value.tolist()  # object arrays have no raw byte form; send their items
        if by_reference and (place := shared_place(value)) is not None:
            name, offset = place
            shared = [name, offset, _dtype_description(value.dtype), list(value.shape)]
            return msgpack.ExtType(SHARED_EXT, msgpack.packb(shared))
        array = value if value.flags.c_contiguous else value.copy(order="C")
        meta = msgpack.packb([len(buffers), _dtype_description(array.dtype), list(array.shape)])
        # A uint8 view gives a flat byte buffer for every dtype, datetime64 included.
        buffers.append(array.reshape(-1).view(np.uint8).data if array.size else b"")
        return msgpack.ExtType(NDARRAY_EXT, meta)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"cannot send a value of type {type(value).__qualname__}")


def _dtype_description(dtype: np.dtype[Any]) -> Any:
    # ml_dtypes' types (bfloat16) say only "<V2" in their str: they go by name.
    if dtype.fields:
        return dtype.descr
    return dtype.name if dtype.kind == "V" else dtype.str


def _unpack_extension(buffers: Sequence[bytes], code: int, data: bytes) -> Any:
    if code == SHARED_EXT:
        name, offset, dtype, shape = msgpack.unpackb(data)
        return SharedPlace(name, offset, _dtype_of(dtype), shape)
    if code != NDARRAY_EXT:
        raise ProtocolError(f"unknown msgpack extension type {code}")
    index, dtype, shape = msgpack.unpackb(data)
    if not 0 <= index < len(buffers):
        raise ProtocolError(f"array refers to buffer {index}, message has {len(buffers)}")
    return np.frombuffer(buffers[index], dtype=_dtype_of(dtype)).reshape(shape)


def _dtype_of(description: Any) -> np.dtype[Any]:
    """A dtype from its string, or from a structured dtype's ``descr`` (lists after msgpack)."""
    if isinstance(description, str):
        try:
            return np.dtype(description)
        except TypeError:
            import ml_dtypes  # noqa: F401  (registers bfloat16 and its kin with numpy, once)

            return np.dtype(description)
    return np.dtype([_field_of(field) for field in description])


def _field_of(field: list[Any]) -> tuple[Any, ...]:
    name, kind, *shape = field
    kind = kind if isinstance(kind, str) else _dtype_of(kind)
    return (name, kind, tuple(shape[0])) if shape else (name, kind)
