"""``memory_mb`` enforced by the kernel: a cgroup v2 ``memory.max`` for each worker, where
ketch may make one.

cgroup v2 lets a cgroup's children have memory limits only when it has no processes of its
own (the "no internal processes" rule). So, at start, before any worker exists, the gateway
moves itself into a leaf of its own cgroup (``ketch-gateway``), turns the memory controller on
for its cgroup's children, and makes ``ketch-workers`` beside that leaf; each worker with a
``memory_mb`` gets ``ketch-workers/worker-PID`` with ``memory.max`` at the cap and no swap. A
worker that passes it is killed by the kernel's OOM killer at once, however fast it grew.

That takes a cgroup v2 hierarchy with the memory controller, write access to the gateway's
own cgroup and no other process in it: a systemd service with ``Delegate=yes``, say. Anywhere
else (cgroup v1, a read-only ``/sys/fs/cgroup``, a shared cgroup) :meth:`MemoryCgroups.create`
says why at INFO and returns None; then the worker's own ``RLIMIT_DATA``
(:func:`ketch.specs.resources.limit_data_memory`) and the gateway's resident-memory check are
what enforce the cap.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger("ketch.workers")

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
MIB = 2**20


class MemoryCgroups:
    """The ``ketch-workers`` cgroup, and one child per capped worker."""

    def __init__(self, workers: Path) -> None:
        self._workers = workers

    @classmethod
    def create(
        cls, root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP, pid: int | None = None
    ) -> MemoryCgroups | None:
        """Set up the cgroups for the gateway process ``pid`` (this one by default); None,
        with the reason logged, where this machine does not allow it."""
        try:
            return cls(_delegate(root, self_cgroup, pid or os.getpid()))
        except (OSError, ValueError) as exc:
            log.info(
                "memory_mb without a cgroup (the kernel's rlimit and the check remain): %s", exc
            )
            return None

    def confine(self, pid: int, memory_mb: int) -> Path | None:
        """Put worker ``pid`` under a ``memory.max`` of ``memory_mb``; its cgroup, or None
        (logged) when that failed."""
        group = self._workers / f"worker-{pid}"
        try:
            group.mkdir(exist_ok=True)
            (group / "memory.max").write_text(str(memory_mb * MIB))
            swap = group / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")  # the cap is on memory, not on memory plus swap
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            log.warning("worker pid %d has no memory cgroup: %s", pid, exc)
            self.remove(group)
            return None
        return group

    @staticmethod
    def oom_killed(group: Path) -> bool:
        """Whether the kernel killed a process of ``group`` for passing its ``memory.max``."""
        try:
            events = (group / "memory.events").read_text().split()
        except OSError:
            return False
        counts = dict(zip(events[::2], events[1::2], strict=False))
        return int(counts.get("oom_kill", "0")) > 0

    @staticmethod
    def remove(group: Path) -> None:
        """Remove an emptied worker cgroup (its process has exited)."""
        with contextlib.suppress(OSError):
            group.rmdir()


def _delegate(root: Path, self_cgroup: Path, pid: int) -> Path:
    """Move ``pid`` into a leaf of its cgroup and return a ``ketch-workers`` cgroup beside it
    whose children may have memory limits."""
    if not (root / "cgroup.controllers").exists():
        raise ValueError(f"{root} is not a cgroup v2 hierarchy")
    entries = [line for line in self_cgroup.read_text().splitlines() if line.startswith("0::")]
    if not entries:
        raise ValueError("this process is in no cgroup v2")
    own = root / entries[0].removeprefix("0::").lstrip("/")
    if "memory" not in (own / "cgroup.controllers").read_text().split():
        raise ValueError(f"the memory controller is not available in {own}")
    if own.name != "ketch-gateway":
        others = set((own / "cgroup.procs").read_text().split()) - {str(pid)}
        if others:
            # ketch moves only itself: the controller could not be turned on with them there.
            raise ValueError(f"{len(others)} other processes share {own}")
        gateway = own / "ketch-gateway"
        gateway.mkdir(exist_ok=True)
        (gateway / "cgroup.procs").write_text(str(pid))
    else:  # already moved (a second server in the same process, as tests run it)
        own = own.parent
    # Fails (EBUSY) while other processes share the cgroup: ketch does not move those.
    (own / "cgroup.subtree_control").write_text("+memory")
    workers = own / "ketch-workers"
    workers.mkdir(exist_ok=True)
    (workers / "cgroup.subtree_control").write_text("+memory")
    return workers
