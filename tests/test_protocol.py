"""Unit tests for ``ketch.zmq_transport.protocol``: framing, headers and raw array buffers."""

from __future__ import annotations

import mmap
import os
import pickle
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import pytest

from ketch.zmq_transport.protocol import (
    NDARRAY_EXT,
    PROTOCOL,
    Command,
    Frame,
    Message,
    ProtocolError,
    command_of,
    decode,
    encode,
    split_envelope,
)
from ketch.zmq_transport.shared_arrays import (
    SHM_FOLDER,
    SharedArray,
    SharedMappings,
    SharedPlace,
)


def as_wire(frames: Sequence[Frame]) -> list[bytes]:
    """The frames as a peer receives them: plain bytes, no memory shared with the sender."""
    return [bytes(frame) for frame in frames]


def head(command: bytes, header: bytes, protocol: bytes = PROTOCOL) -> bytes:
    """A head frame made by hand: protocol, command byte, msgpack header."""
    return protocol + command + header


def round_trip(command: Command, header: dict[str, Any]) -> Message:
    return decode(as_wire(encode(command, header)))


# --- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", list(Command))
def test_every_command_round_trips(command: Command) -> None:
    header = {"id": 7, "reason": "bye", "nested": {"a": [1, 2.5, None, True, "x", b"raw"]}}
    message = round_trip(command, header)
    assert message.command is command
    assert message.header == header


def test_one_head_frame_is_protocol_command_header() -> None:
    frames = encode(Command.HEARTBEAT)
    assert len(frames) == 1
    assert PROTOCOL == b"KETCH/2"
    assert frames[0][:7] == PROTOCOL
    assert frames[0][7:8] == Command.HEARTBEAT.value
    assert msgpack.unpackb(frames[0][8:]) == {}


def test_arrays_travel_as_frames_after_the_head() -> None:
    frames = encode(Command.REPLY, {"id": 1, "outputs": np.arange(3, dtype=np.int64)})
    assert len(frames) == 2
    assert bytes(frames[1]) == np.arange(3, dtype=np.int64).tobytes()


@pytest.mark.parametrize("command", list(Command))
def test_command_of_reads_the_command_without_the_header(command: Command) -> None:
    assert command_of([head(command.value, b"\xc1 not msgpack")]) is command


@pytest.mark.parametrize("frames", [[], [b""], [b"KETCH/1\x02\x80"], [head(b"\x09", b"\x80")]])
def test_command_of_is_none_for_what_is_not_a_message(frames: list[bytes]) -> None:
    assert command_of(frames) is None


def test_missing_header_decodes_as_empty_map() -> None:
    assert round_trip(Command.HEARTBEAT, {}).header == {}
    assert decode(as_wire(encode(Command.DISCONNECT, None))).header == {}


def test_tuples_and_sets_become_lists() -> None:
    header = round_trip(Command.REPLY, {"t": (1, 2), "s": {3}, "f": frozenset({4})}).header
    assert header == {"t": [1, 2], "s": [3], "f": [4]}


def test_integer_map_keys_survive() -> None:
    assert round_trip(Command.REPLY, {"m": {1: "one"}}).header == {"m": {1: "one"}}


# --- numpy arrays as raw buffer frames -------------------------------------------------------


ARRAYS = [
    pytest.param(np.arange(12, dtype=np.float32).reshape(3, 4), id="float32-2d"),
    pytest.param(np.linspace(0, 1, 5), id="float64-1d"),
    pytest.param(np.array([[[1, -2]], [[3, -4]]], dtype=np.int8), id="int8-3d"),
    pytest.param(np.array([2**40, -(2**40)], dtype=np.int64), id="int64"),
    pytest.param(np.array([1, 2, 3], dtype=">i4"), id="big-endian-int32"),
    pytest.param(np.array([0, 65535], dtype=np.uint16), id="uint16"),
    pytest.param(np.array([0.5, -1.5], dtype=np.float16), id="float16"),
    pytest.param(np.array([1 + 2j, -3.5j]), id="complex128"),
    pytest.param(np.array([True, False, True]), id="bool"),
    pytest.param(np.array(["ab", "c", "déjà"]), id="unicode"),
    pytest.param(np.array([b"ab", b"\x00c"]), id="bytes"),
    pytest.param(np.zeros((0,), dtype=np.float32), id="empty-1d"),
    pytest.param(np.zeros((0, 3), dtype=np.int16), id="empty-0x3"),
    pytest.param(np.zeros((4, 0, 2)), id="empty-4x0x2"),
    pytest.param(np.zeros((2, 0), dtype="U3"), id="empty-unicode"),
]


@pytest.mark.parametrize("array", ARRAYS)
def test_array_round_trips_with_dtype_and_shape(array: np.ndarray) -> None:
    decoded = round_trip(Command.REPLY, {"outputs": array}).header["outputs"]
    assert isinstance(decoded, np.ndarray)
    assert decoded.dtype == array.dtype
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("array", ARRAYS)
def test_array_travels_as_raw_buffer_frame_not_in_header(array: np.ndarray) -> None:
    frames = as_wire(encode(Command.REPLY, {"outputs": array}))
    assert len(frames) == 2
    header, buffer = frames[0][8:], frames[1]
    assert buffer == array.tobytes()
    # The header only describes the array: index, dtype and shape, not its bytes.
    if array.nbytes >= 8:
        assert array.tobytes() not in header
    ext = msgpack.unpackb(header, ext_hook=lambda code, data: (code, msgpack.unpackb(data)))
    assert ext["outputs"] == (NDARRAY_EXT, [0, array.dtype.str, list(array.shape)])


def test_large_array_keeps_header_small() -> None:
    array = np.random.default_rng(0).random((256, 256))
    frames = as_wire(encode(Command.REPLY, {"id": 1, "outputs": array}))
    assert len(frames[0]) < 100
    assert frames[1] == array.tobytes()


def test_several_arrays_get_one_frame_each_in_order() -> None:
    first = np.arange(3, dtype=np.int32)
    second = np.ones((2, 2), dtype=np.float64)
    third = np.zeros(0, dtype=np.uint8)
    header = {"inputs": [first, {"nested": second}, third], "id": 3}
    frames = as_wire(encode(Command.REQUEST, header))
    assert frames[1:] == [first.tobytes(), second.tobytes(), b""]
    decoded = decode(frames).header
    np.testing.assert_array_equal(decoded["inputs"][0], first)
    np.testing.assert_array_equal(decoded["inputs"][1]["nested"], second)
    assert decoded["inputs"][2].shape == (0,)
    assert decoded["id"] == 3


def test_non_contiguous_array_is_sent_in_logical_order() -> None:
    base = np.arange(12, dtype=np.int64).reshape(3, 4)
    view = base.T[::2]
    assert not view.flags.c_contiguous
    frames = as_wire(encode(Command.REPLY, {"outputs": view}))
    assert frames[1] == np.ascontiguousarray(view).tobytes()
    np.testing.assert_array_equal(decode(frames).header["outputs"], view)


def test_zero_dimensional_array_keeps_its_shape() -> None:
    array = np.array(3.5)
    decoded = round_trip(Command.REPLY, {"outputs": [array]}).header["outputs"][0]
    assert decoded.shape == ()
    assert decoded == 3.5


def test_structured_array_keeps_its_fields() -> None:
    array = np.array([(1, 2.5), (3, 4.5)], dtype=[("count", "<i4"), ("score", "<f8")])
    decoded = round_trip(Command.REPLY, {"outputs": array}).header["outputs"]
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded["score"], [2.5, 4.5])


@pytest.mark.parametrize(
    "array",
    [
        pytest.param(np.array(["2024-01-01", "2024-02-29"], dtype="datetime64[D]"), id="datetime"),
        pytest.param(np.array([1, 90], dtype="timedelta64[s]"), id="timedelta"),
    ],
)
def test_datetime_arrays_round_trip(array: np.ndarray) -> None:
    decoded = round_trip(Command.REPLY, {"outputs": array}).header["outputs"]
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


# --- other numpy values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected", "kind"),
    [
        (np.int64(5), 5, int),
        (np.uint8(255), 255, int),
        (np.int32(-7), -7, int),
        (np.float32(1.5), 1.5, float),
        (np.float64(2.25), 2.25, float),
        (np.bool_(True), True, bool),
        (np.str_("hi"), "hi", str),
    ],
)
def test_numpy_scalars_become_plain_numbers(value: Any, expected: Any, kind: type) -> None:
    frames = as_wire(encode(Command.REPLY, {"outputs": [value]}))
    assert len(frames) == 1  # no buffer frame for a scalar
    decoded = decode(frames).header["outputs"][0]
    assert type(decoded) is kind
    assert decoded == expected


def test_object_arrays_become_lists() -> None:
    array = np.array([None, "text", 3, [1, 2]], dtype=object)
    frames = as_wire(encode(Command.REPLY, {"outputs": array}))
    assert len(frames) == 1  # items in the header, no raw buffer
    assert decode(frames).header["outputs"] == [None, "text", 3, [1, 2]]


def test_object_array_items_that_are_arrays_still_travel_raw() -> None:
    inner = np.arange(4, dtype=np.int16)
    array = np.empty(2, dtype=object)
    array[0] = inner
    array[1] = "label"
    frames = as_wire(encode(Command.REPLY, {"outputs": array}))
    assert frames[1:] == [inner.tobytes()]
    decoded = decode(frames).header["outputs"]
    np.testing.assert_array_equal(decoded[0], inner)
    assert decoded[1] == "label"


# --- unsendable values -----------------------------------------------------------------------


class Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (object(), "object"),
        (Opaque(), "Opaque"),
        (1 + 2j, "complex"),
        (2**64, "int"),
        (lambda: None, "function"),
    ],
)
def test_unsendable_value_raises_type_error_naming_the_type(value: Any, type_name: str) -> None:
    with pytest.raises(TypeError, match=rf"cannot send a value of type {type_name}\b"):
        encode(Command.REPLY, {"id": 1, "outputs": [value]})


# --- no pickle -------------------------------------------------------------------------------


class Picklable:
    """Pickle would happily send this; the protocol must not."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Picklable, ())


def test_picklable_class_instance_is_refused() -> None:
    pickle.dumps(Picklable())  # pickle could send it ...
    with pytest.raises(TypeError, match="Picklable"):  # ... the protocol does not
        encode(Command.REPLY, {"outputs": [Picklable()]})


def test_no_pickle_is_used_for_arrays_or_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle used on the wire")

    for name in ("dumps", "dump", "loads", "load", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    header = {"id": 1, "outputs": [np.arange(4), np.array(["a"], dtype=object), np.float32(1)]}
    frames = as_wire(encode(Command.REPLY, header))
    for frame in frames:
        # A pickle stream of protocol 2+ starts with PROTO (0x80) and ends with STOP ('.').
        assert not (frame[:1] == b"\x80" and frame[-1:] == b"." and len(frame) > 2)
    decoded = decode(frames).header
    np.testing.assert_array_equal(decoded["outputs"][0], np.arange(4))
    assert decoded["outputs"][1:] == [["a"], 1.0]


def test_object_array_of_unsendable_items_is_refused() -> None:
    array = np.array([Opaque()], dtype=object)
    with pytest.raises(TypeError, match="Opaque"):
        encode(Command.REPLY, {"outputs": array})


# --- malformed messages ----------------------------------------------------------------------


def valid_frames() -> list[bytes]:
    return as_wire(encode(Command.REQUEST, {"id": 1, "inputs": [1]}))


def test_wrong_protocol_version_is_refused_naming_both() -> None:
    frames = valid_frames()
    frames[0] = b"KETCH/1" + frames[0][7:]
    with pytest.raises(ProtocolError, match=r"peer speaks protocol b'KETCH/1'.*b'KETCH/2'"):
        decode(frames)


def test_long_foreign_protocol_is_truncated_in_the_message() -> None:
    frames = valid_frames()
    frames[0] = b"GET / HTTP/1.1\r\nHost: example\r\n" * 10
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert len(str(info.value)) < 120


@pytest.mark.parametrize("command", [b"\x00", b"\x08", b"\xff", b""])
def test_unknown_command_byte_is_refused_naming_it(command: bytes) -> None:
    with pytest.raises(ProtocolError, match="unknown command byte") as info:
        decode([head(command, b"")])
    assert repr(command) in str(info.value)


def test_no_frames_are_refused() -> None:
    with pytest.raises(ProtocolError, match="at least 1 frame, got none"):
        decode([])


@pytest.mark.parametrize("header", [b"", b"\xc1", b"\x81\xa1", b"\x92\x01"])
def test_non_msgpack_header_is_refused(header: bytes) -> None:
    with pytest.raises(ProtocolError, match="header of REQUEST is not valid msgpack"):
        decode([head(Command.REQUEST.value, header)])


@pytest.mark.parametrize(
    ("value", "type_name"), [([1, 2], "list"), ("text", "str"), (3, "int"), (None, "NoneType")]
)
def test_header_that_is_not_a_map_is_refused(value: Any, type_name: str) -> None:
    frames = [head(Command.REQUEST.value, msgpack.packb(value))]
    with pytest.raises(ProtocolError, match=rf"header of REQUEST must be a map, got {type_name}"):
        decode(frames)


def test_array_buffer_index_out_of_range_is_refused() -> None:
    frames = as_wire(encode(Command.REPLY, {"outputs": np.arange(3)}))
    with pytest.raises(ProtocolError, match="array refers to buffer 0, message has 0"):
        decode(frames[:1])


def test_negative_array_buffer_index_is_refused() -> None:
    meta = msgpack.packb([-1, "<i8", [3]])
    header = msgpack.packb({"outputs": msgpack.ExtType(NDARRAY_EXT, meta)})
    with pytest.raises(ProtocolError, match="array refers to buffer -1, message has 1"):
        decode([head(Command.REPLY.value, header), np.arange(3).tobytes()])


def test_unknown_extension_type_is_refused() -> None:
    header = msgpack.packb({"x": msgpack.ExtType(42, b"")})
    with pytest.raises(ProtocolError, match="unknown msgpack extension type 42"):
        decode([head(Command.REPLY.value, header)])


def test_buffer_that_does_not_match_shape_is_a_protocol_error() -> None:
    frames = as_wire(encode(Command.REPLY, {"outputs": np.arange(6).reshape(2, 3)}))
    frames[1] = frames[1][:-8]
    with pytest.raises(ProtocolError, match="REPLY"):
        decode(frames)


# --- envelope --------------------------------------------------------------------------------


def test_split_envelope_returns_identity_and_message() -> None:
    message = valid_frames()
    identity, rest = split_envelope([b"\x00worker-1", *message])
    assert identity == b"\x00worker-1"
    assert list(rest) == message
    assert decode(rest).header == {"id": 1, "inputs": [1]}


@pytest.mark.parametrize(
    "frames",
    [[], [b"identity"]],
    ids=["none", "identity-only"],
)
def test_split_envelope_refuses_missing_envelope(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError, match=r"lacks the \[identity, head\] envelope"):
        split_envelope(frames)


def test_an_array_in_shared_memory_goes_by_its_place_to_a_peer_that_shares_it() -> None:
    """By reference: no buffer, and the peer maps the object itself; otherwise its bytes go."""
    name = f"ketch-protocol-test-{os.getpid()}"
    path = os.path.join(SHM_FOLDER, name)
    values = np.arange(8, dtype=np.float32)
    with open(path, "wb") as file:
        file.write(b"\0" * 16 + values.tobytes())
    try:
        with open(path, "r+b") as file:
            mapping = mmap.mmap(file.fileno(), 0)
        view = np.frombuffer(mapping, dtype=np.float32, count=8, offset=16).reshape(2, 4)
        shared = SharedArray.over(view, name, 16)

        by_bytes = encode(Command.REQUEST, {"id": 1, "inputs": shared})
        assert len(by_bytes) == 2, "its bytes travel as a frame"
        by_place = encode(Command.REQUEST, {"id": 1, "inputs": shared}, by_reference=True)
        assert len(by_place) == 1, "only the head: no buffer"
        place = decode(as_wire(by_place)).header["inputs"]
        assert isinstance(place, SharedPlace)
        mapped = SharedMappings().array(place)
        np.testing.assert_array_equal(mapped, values.reshape(2, 4))
        assert not mapped.flags.writeable
        # A slice of it is no longer where the object says: its bytes go, by reference or not.
        part = encode(Command.REQUEST, {"id": 1, "inputs": shared[1:]}, by_reference=True)
        assert len(part) == 2
        np.testing.assert_array_equal(decode(as_wire(part)).header["inputs"], values[4:][None])
    finally:
        os.unlink(path)
    with pytest.raises(ValueError, match="holding an input is gone"):
        SharedMappings().array(place)
