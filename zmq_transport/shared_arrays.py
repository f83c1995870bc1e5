"""Arrays that live in POSIX shared memory, sent to a worker by reference.

A client of Triton's shared memory extension leaves an input in a shared-memory object
(``/dev/shm/NAME``) that the gateway has mapped. When the worker computing the batch sees the
same ``/dev/shm`` (a process on the gateway's machine, in its mount namespace: READY says which
``/dev/shm`` a worker sees, :func:`shm_identity`), the REQUEST carries the array's place in the
object, not its bytes: the worker maps the object itself (read-only) and the model reads the
client's bytes where they lie. For any other worker the array goes as bytes, as every array
does.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Where POSIX shared-memory objects are files.
SHM_FOLDER = "/dev/shm"
#: A shared-memory object's name, without its leading slash.
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,255}$")


class SharedArray(np.ndarray):
    """An array whose bytes lie in shared-memory object ``shm_name`` from byte ``shm_offset``.

    Only the array made by :meth:`over` knows its place: views and slices of it are plain
    arrays as far as sending goes (their bytes go), since their place would differ."""

    shm_name: str | None = None
    shm_offset: int = 0

    @classmethod
    def over(cls, array: np.ndarray, name: str, offset: int) -> SharedArray:
        shared = array.view(cls)
        shared.shm_name = name
        shared.shm_offset = offset
        return shared

    def __array_finalize__(self, obj: Any) -> None:
        self.shm_name = None
        self.shm_offset = 0


def shared_place(array: np.ndarray) -> tuple[str, int] | None:
    """The object and offset to send ``array`` by, or None when its bytes must go."""
    if isinstance(array, SharedArray) and array.shm_name is not None:
        if array.flags.c_contiguous and array.dtype.isnative and not array.dtype.hasobject:
            return array.shm_name, array.shm_offset
    return None


@dataclass(frozen=True, slots=True)
class SharedPlace:
    """An array as a REQUEST names it in shared memory: mapped by :class:`SharedMappings`."""

    name: str
    offset: int
    dtype: np.dtype[Any]
    shape: list[int]


def shm_identity() -> str | None:
    """Which ``/dev/shm`` this process sees (its device and inode), or None without one."""
    try:
        info = os.stat(SHM_FOLDER)
    except OSError:
        return None
    return f"{info.st_dev}:{info.st_ino}"


class SharedMappings:
    """The worker's read-only mappings of shared-memory objects, one per object while it
    stays the same file (a client that makes the object anew gets it mapped anew)."""

    def __init__(self) -> None:
        self._mapped: dict[str, tuple[tuple[int, int, int], mmap.mmap]] = {}

    def array(self, place: SharedPlace) -> np.ndarray:
        """The array ``place`` names (read-only); ``ValueError`` when it is not there."""
        name, offset, dtype, shape = place.name, place.offset, place.dtype, place.shape
        if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
            raise ValueError(f"{name!r} is not a shared-memory object's name")
        if not isinstance(offset, int) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"bad place in shared memory object /{name}: {offset}, {shape}")
        count = int(np.prod(shape)) if shape else 1
        mapping = self._mapping(name)
        if offset < 0 or offset + count * dtype.itemsize > len(mapping):
            raise ValueError(
                f"an input's place ({offset} + {count * dtype.itemsize} bytes) runs past the "
                f"end of shared memory object /{name} ({len(mapping)} bytes)"
            )
        return np.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(shape)

    def _mapping(self, name: str) -> mmap.mmap:
        path = os.path.join(SHM_FOLDER, name)
        try:
            info = os.stat(path, follow_symlinks=False)
        except OSError as exc:
            raise ValueError(
                f"shared memory object /{name} holding an input is gone: {exc.strerror}"
            ) from None
        which = (info.st_dev, info.st_ino, info.st_size)
        known = self._mapped.get(name)
        if known is not None and known[0] == which:
            return known[1]
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            mapping = mmap.mmap(descriptor, info.st_size, access=mmap.ACCESS_READ)
        finally:
            os.close(descriptor)
        # The old mapping, if any, stays alive as long as arrays over it do.
        self._mapped[name] = (which, mapping)
        return mapping
