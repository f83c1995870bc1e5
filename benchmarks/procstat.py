"""CPU accounting from Linux's /proc, to tell what the server, the load generator and everything
else on the machine spent during a run.

On a small shared machine the third figure matters: a test suite running beside the benchmark
takes cores from the server and makes its figures meaningless, and only the system-wide total
shows it. Every function returns None where /proc is not available (macOS, Windows).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def group_members(pgid: int) -> list[tuple[int, str, int]]:
    """(pid, state, CPU clock ticks) of every process in a process group."""
    members = []
    for stat_file in _PROC.glob("[0-9]*/stat"):
        try:
            text = stat_file.read_text()
        except OSError:  # the process exited while we looked
            continue
        # The command name (field 2) may hold spaces and parentheses; the fields after it don't.
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            ticks = int(fields[11]) + int(fields[12])  # utime + stime
            members.append((int(stat_file.parent.name), fields[0], ticks))
    return members


def group_cpu_seconds(pgid: int) -> float | None:
    """CPU time used so far by the live processes of a process group."""
    if not _PROC.joinpath("self/stat").exists():
        return None
    return sum(ticks for _, _, ticks in group_members(pgid)) / _clock_ticks()


def system_busy_seconds() -> float | None:
    """CPU time all cores of the machine have spent busy since boot."""
    try:
        first_line = _PROC.joinpath("stat").read_text().split("\n", 1)[0]
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal; guest time is already in user and nice.
    ticks = [int(field) for field in first_line.split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _clock_ticks()


def own_cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the load generator's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds at one moment; two of them give a :class:`CpuShares`."""

    wall_s: float
    server_s: float | None
    own_s: float
    system_s: float | None

    @classmethod
    def take(cls, server_pgid: int) -> CpuSample:
        return cls(
            time.monotonic(),
            group_cpu_seconds(server_pgid),
            own_cpu_seconds(),
            system_busy_seconds(),
        )


@dataclass(frozen=True)
class CpuShares:
    """CPU used between two samples, each as a share of one core (1.0 = one core busy)."""

    server: float | None
    client: float
    other: float | None

    @classmethod
    def between(cls, before: CpuSample, after: CpuSample) -> CpuShares:
        wall = after.wall_s - before.wall_s
        client = (after.own_s - before.own_s) / wall
        server = other = None
        if before.server_s is not None and after.server_s is not None:
            server = (after.server_s - before.server_s) / wall
        if server is not None and before.system_s is not None and after.system_s is not None:
            other = max(0.0, (after.system_s - before.system_s) / wall - server - client)
        return cls(server, client, other)
