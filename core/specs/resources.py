"""What a model's workers may use: CPU cores, resident memory, math-library threads, GPUs.

A worker applies its own limits as it starts (:func:`apply`): CPU affinity through psutil,
thread counts through the environment variables the math libraries read when they load, plus
threadpoolctl for the BLAS numpy already loaded, and ``CUDA_VISIBLE_DEVICES`` for the GPUs.
The memory cap is enforced twice. The kernel refuses, at once, any allocation that would take
the worker's private writable memory past :func:`data_limit_bytes` (``RLIMIT_DATA``): one huge
allocation fails with ``MemoryError`` in the model instead of exhausting the host. It counts
what is mapped, not what is resident (thread stacks, a BLAS library's buffers), so it leaves
headroom above ``memory_mb``. The cap itself, on resident memory, is enforced from outside, by
the gateway watching each worker (:func:`over_memory_cap`) and recycling one past it: a process
cannot be trusted to police its own leaks.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import psutil
from msgspec.structs import force_setattr

#: Environment variables through which OpenMP, MKL, OpenBLAS, numexpr and Accelerate take
#: their thread counts.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


class Resources(msgspec.Struct, frozen=True, kw_only=True):
    """Limits for each worker of a model; ``None`` leaves that resource alone.

    :param cpus: cores the worker may run on (CPU affinity), e.g. ``(0, 1)``.
    :param memory_mb: resident memory above which the worker is recycled; the kernel also
        refuses allocations past :func:`data_limit_bytes` of private writable memory.
    :param threads: threads the math libraries (OpenMP, MKL, OpenBLAS, torch) may use.
    :param gpus: GPU indices the worker sees (``CUDA_VISIBLE_DEVICES``); ``()`` hides all.
    """

    cpus: tuple[int, ...] | None = None
    memory_mb: int | None = None
    threads: int | None = None
    gpus: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("cpus", "gpus"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, int | str) or not isinstance(value, Iterable):
                raise TypeError(f"{name} must be a list of indices, got {value!r}")
            items = tuple(value)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
                raise ValueError(f"{name} must hold indices >= 0, got {value!r}")
            if name == "cpus" and not items:
                raise ValueError("cpus must name at least one core")
            force_setattr(self, name, items)
        for name in ("memory_mb", "threads"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Resources:
        """Rebuild limits from their plain form, ignoring keys a newer peer may add."""
        return msgspec.convert(data, cls)


def apply(resources: Resources) -> None:
    """Apply ``resources`` to the calling worker process; call it before the model loads.

    Raises ``ValueError`` naming the cores when the affinity cannot be set (a core this
    machine does not have).
    """
    if resources.cpus is not None:
        try:
            psutil.Process().cpu_affinity(list(resources.cpus))
        except (ValueError, OSError) as exc:
            available = psutil.Process().cpu_affinity()
            raise ValueError(
                f"cannot pin the worker to cores {list(resources.cpus)}: {exc}; "
                f"this machine offers {available}"
            ) from None
    if resources.gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in resources.gpus)
    if resources.threads is not None:
        limit_threads(resources.threads)
    if resources.memory_mb is not None:
        limit_data_memory(resources.memory_mb)


#: Private writable memory allowed beyond twice ``memory_mb``: numpy with OpenBLAS maps about
#: 60 MB more than it keeps resident, a framework more.
DATA_HEADROOM_MB = 256


def data_limit_bytes(memory_mb: int) -> int:
    """The ``RLIMIT_DATA`` of a worker capped at ``memory_mb`` of resident memory."""
    return (2 * memory_mb + DATA_HEADROOM_MB) * 1024 * 1024


def limit_data_memory(memory_mb: int) -> None:
    """Have the kernel refuse allocations past :func:`data_limit_bytes` (never raising a
    limit someone already set lower)."""
    limit = data_limit_bytes(memory_mb)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def limit_threads(threads: int) -> None:
    """Cap the math libraries' threads: those loaded later by the environment, those already
    loaded (numpy's BLAS, torch) directly."""
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def over_memory_cap(process: psutil.Process, memory_mb: int) -> int | None:
    """The process's resident memory in MB when it exceeds ``memory_mb``, else None."""
    try:
        rss_mb = process.memory_info().rss // (1024 * 1024)
    except psutil.Error:
        return None  # exited meanwhile: its exit is reported on its own
    return rss_mb if rss_mb > memory_mb else None
