"""The cgroup v2 set-up for memory_mb, on a tree laid out as the kernel shows one (the files
the kernel would act on are plain files here: what is checked is what ketch writes where)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ketch.pools.cgroups import MemoryCgroups


def delegated_tree(tmp_path: Path, controllers: str = "cpu io memory pids") -> tuple[Path, Path]:
    """A cgroup v2 root with a service cgroup this process is in; (root, /proc/self/cgroup)."""
    root = tmp_path / "cgroup"
    service = root / "system.slice" / "ketch.service"
    service.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    (service / "cgroup.controllers").write_text(controllers + "\n")
    (service / "cgroup.subtree_control").write_text("")
    (service / "cgroup.procs").write_text("4000\n")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("0::/system.slice/ketch.service\n")
    return root, self_cgroup


def test_the_gateway_moves_into_a_leaf_and_workers_get_memory_max(tmp_path: Path) -> None:
    root, self_cgroup = delegated_tree(tmp_path)
    cgroups = MemoryCgroups.create(root, self_cgroup, pid=4000)
    assert cgroups is not None
    service = root / "system.slice" / "ketch.service"
    assert (service / "ketch-gateway" / "cgroup.procs").read_text() == "4000"
    assert (service / "cgroup.subtree_control").read_text() == "+memory"
    assert (service / "ketch-workers" / "cgroup.subtree_control").read_text() == "+memory"

    group = cgroups.confine(4242, memory_mb=200)
    assert group == service / "ketch-workers" / "worker-4242"
    assert (group / "memory.max").read_text() == str(200 * 2**20)
    assert (group / "cgroup.procs").read_text() == "4242"
    assert not MemoryCgroups.oom_killed(group)
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n")
    assert MemoryCgroups.oom_killed(group)
    for name in ("memory.max", "cgroup.procs", "memory.events"):
        (group / name).unlink()  # the kernel's files go with the cgroup
    MemoryCgroups.remove(group)
    assert not group.exists()


@pytest.mark.parametrize(
    ("layout", "reason"),
    [
        ("v1", "is not a cgroup v2 hierarchy"),
        ("no memory controller", "the memory controller is not available"),
        ("shared", "1 other processes share"),
    ],
)
def test_where_ketch_may_not_make_cgroups_it_says_why_and_makes_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, layout: str, reason: str
) -> None:
    root, self_cgroup = delegated_tree(
        tmp_path, "cpu pids" if layout == "no memory controller" else "cpu io memory pids"
    )
    if layout == "v1":
        (root / "cgroup.controllers").unlink()
    if layout == "shared":
        (root / "system.slice" / "ketch.service" / "cgroup.procs").write_text("4000\n31\n")
    with caplog.at_level(logging.INFO, logger="ketch.workers"):
        assert MemoryCgroups.create(root, self_cgroup, pid=4000) is None
    assert reason in caplog.text
    assert not (root / "system.slice" / "ketch.service" / "ketch-gateway").exists()


def test_on_this_machine_it_makes_cgroups_only_where_the_kernel_lets_it() -> None:
    cgroups = MemoryCgroups.create(root=Path("/nonexistent-cgroup-root"))
    assert cgroups is None
