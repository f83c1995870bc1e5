"""Triton's system shared memory extension: clients on the server's machine register POSIX
shared-memory objects (``shm_open``'s names, ``/dev/shm`` here) as named regions, then name a
region, an offset and a size in place of an input's data or as where an output goes.

The gateway maps each region once, at registration. An input of numbers is a read-only view
of the client's bytes (no copy through a socket or the request body), and when it makes a batch
by itself, a worker that sees the same ``/dev/shm`` gets its place in the object instead of its
bytes and maps it in turn (:mod:`ketch.zmq_transport.shared_arrays`): the model reads the
client's memory. Batched with other requests, or sent to a worker elsewhere, its bytes go as
any input's do. BYTES inputs are copied out as ``bytes``. The gateway writes an output's bytes
into its region and answers with the output's shape and size only. A region stays mapped until it is
unregistered; one still read by a request in flight is closed when that request lets go.

Trust: a client allowed to predict may map any shared-memory object the server's user may
open, as with Triton. CUDA shared memory is refused: ketch hands clients no GPU memory.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from ketch.inference.tensors import V2_TO_NUMPY, tensor_from_binary, tensor_to_binary
from ketch.serving.jobs import PredictionError
from ketch.zmq_transport.shared_arrays import SharedArray

#: Where Linux keeps POSIX shared-memory objects: ``shm_open("/name")`` is this folder's file.
SHM_FOLDER = "/dev/shm"
#: A shared-memory object's name as ``shm_open`` takes it: one leading slash, one component.
_KEY = re.compile(r"^/?([A-Za-z0-9_.\-]{1,255})$")
#: The request parameters that place a tensor in a region (Triton's names).
REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"


class RegionStatus(msgspec.Struct, kw_only=True):
    """One registered region, as ``GET /v2/systemsharedmemory/status`` lists it."""

    name: str
    key: str
    offset: int
    byte_size: int


class RegisterRequest(msgspec.Struct, kw_only=True):
    """``POST /v2/systemsharedmemory/region/{name}/register``."""

    key: str
    byte_size: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a tensor lies: ``byte_size`` bytes at ``offset`` into region ``region``."""

    region: str
    byte_size: int
    offset: int = 0


@dataclass(slots=True)
class _Region:
    status: RegionStatus
    mapping: mmap.mmap
    #: The object's name in ``/dev/shm`` (its key without the slash).
    object_name: str


def placement_of(name: str, parameters: Mapping[str, Any]) -> Placement | None:
    """The region a tensor's ``parameters`` place it in, or None for a tensor not in one."""
    region = parameters.get(REGION)
    if region is None:
        return None
    if not isinstance(region, str) or not region:
        raise PredictionError(400, f"tensor {name!r}: {REGION!r} must be a region's name")
    size, offset = (_bytes(name, region, parameters, key) for key in (BYTE_SIZE, OFFSET))
    return Placement(region, size, offset)


def _bytes(name: str, region: str, parameters: Mapping[str, Any], key: str) -> int:
    value = parameters.get(key, 0 if key == OFFSET else None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PredictionError(
            400, f"tensor {name!r} in region {region!r}: {key!r} must be bytes >= 0"
        )
    return value


class SharedMemory:
    """The system shared memory regions registered with this gateway."""

    def __init__(self) -> None:
        self._regions: dict[str, _Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map ``byte_size`` bytes at ``offset`` of shared-memory object ``key`` as ``name``."""
        if name in self._regions:
            raise PredictionError(
                409, f"shared memory region {name!r} is registered already: unregister it first"
            )
        if offset < 0 or byte_size < 1:
            raise PredictionError(
                400, f"region {name!r}: offset must be >= 0 and byte_size >= 1 bytes"
            )
        if (match := _KEY.match(key)) is None or match.group(1) in (".", ".."):
            raise PredictionError(
                400,
                f"region {name!r}: key {key!r} is not a shared-memory object's name "
                "(shm_open's: a slash, then letters, digits, '_', '.' or '-')",
            )
        path = os.path.join(SHM_FOLDER, match.group(1))
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise PredictionError(
                400, f"Unable to open shared memory region {name!r} (key {key!r}): {exc.strerror}"
            ) from None
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                raise PredictionError(400, f"region {name!r}: {key!r} is no shared-memory object")
            if info.st_size < offset + byte_size:
                raise PredictionError(
                    400,
                    f"region {name!r}: {key!r} holds {info.st_size} bytes, fewer than offset "
                    f"{offset} + byte_size {byte_size}",
                )
            mapping = mmap.mmap(descriptor, info.st_size)
        finally:
            os.close(descriptor)
        status = RegionStatus(name=name, key=key, offset=offset, byte_size=byte_size)
        self._regions[name] = _Region(status, mapping, match.group(1))

    def unregister(self, name: str | None) -> None:
        """Let region ``name`` go (every region with None); an unknown name is no error."""
        names = list(self._regions) if name is None else [name]
        for each in names:
            region = self._regions.pop(each, None)
            if region is not None:
                try:
                    region.mapping.close()
                except BufferError:
                    pass  # a request still reads it: closed when that lets go of it

    def status(self, name: str | None) -> list[RegionStatus]:
        if name is None:
            return [region.status for region in self._regions.values()]
        return [self._region(name).status]

    def read(self, name: str, datatype: str, shape: list[int], where: Placement) -> np.ndarray:
        """Input ``name``'s tensor out of the region ``where`` places it in."""
        region = self._region(where.region)
        mapping, start = self._span(name, where)
        dtype = V2_TO_NUMPY.get(datatype)
        if dtype is not None and datatype != "BYTES" and sys.byteorder == "little":
            # Numbers stay where they lie: a view of the client's bytes (read-only), which a
            # worker that sees this /dev/shm maps itself rather than receiving them.
            count = int(np.prod(shape)) if shape else 1
            if count * dtype.itemsize != where.byte_size:
                raise PredictionError(
                    400,
                    f"input {name!r}: shape {shape} of {datatype} takes "
                    f"{count * dtype.itemsize} bytes, its shared memory gives {where.byte_size}",
                )
            array = np.frombuffer(mapping, dtype=dtype, count=count, offset=start).reshape(shape)
            array.flags.writeable = False
            return SharedArray.over(array, region.object_name, start)
        try:
            return tensor_from_binary(datatype, shape, mapping[start : start + where.byte_size])
        except ValueError as exc:
            raise PredictionError(400, f"input {name!r}: {exc}") from None

    def write(self, name: str, datatype: str, array: np.ndarray, where: Placement) -> int:
        """Write output ``name`` where ``where`` places it; the bytes it took."""
        data = tensor_to_binary(datatype, array)
        if len(data) > where.byte_size:
            raise PredictionError(
                400,
                f"output {name!r} takes {len(data)} bytes, more than the {where.byte_size} its "
                f"shared memory region {where.region!r} was given",
            )
        mapping, start = self._span(name, where)
        mapping[start : start + len(data)] = data
        return len(data)

    def _span(self, tensor: str, where: Placement) -> tuple[mmap.mmap, int]:
        """The mapping ``where`` lies in, and where in it ``where`` starts."""
        region = self._region(where.region)
        if where.offset + where.byte_size > region.status.byte_size:
            raise PredictionError(
                400,
                f"tensor {tensor!r}: offset {where.offset} + byte_size {where.byte_size} runs "
                f"past the end of shared memory region {where.region!r} "
                f"({region.status.byte_size} bytes)",
            )
        return region.mapping, region.status.offset + where.offset

    def _region(self, name: str) -> _Region:
        region = self._regions.get(name)
        if region is None:
            raise PredictionError(
                400, f"Unable to find shared memory region: {name!r} is not registered"
            )
        return region


def cuda_refused() -> PredictionError:
    """What registering CUDA shared memory answers."""
    return PredictionError(
        400,
        "CUDA shared memory is not supported: ketch hands clients no GPU memory; register "
        "system shared memory instead (register_system_shared_memory)",
    )
