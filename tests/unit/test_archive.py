"""``ketch.deploys.archive``: what ``ketch deploy`` packs, and every hostile archive the server
refuses before writing a byte of it."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from ketch.deploys.archive import ArchiveError, files_of, pack, tree_digest, unpack


def code_folder(root: Path) -> Path:
    folder = root / "service"
    (folder / "pkg").mkdir(parents=True)
    (folder / "app.py").write_text("import pkg.util\n")
    (folder / "pkg" / "util.py").write_text("X = 1\n")
    script = folder / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref\n")
    return folder


def test_a_folder_round_trips_with_its_names_contents_and_modes(tmp_path: Path) -> None:
    folder = code_folder(tmp_path)
    files = files_of(folder)
    assert sorted(files) == ["app.py", "pkg/util.py", "run.sh"]  # no caches, no .git
    packed = pack(files, {"ketch-deploy.json": b"{}"}, tmp_path / "a.tar.gz")
    into = tmp_path / "out"
    names = unpack(packed.path, into, max_bytes=2**20)
    assert names == ["app.py", "ketch-deploy.json", "pkg/util.py", "run.sh"]
    assert (into / "pkg" / "util.py").read_text() == "X = 1\n"
    assert stat.S_IMODE((into / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((into / "app.py").stat().st_mode) == 0o644
    assert tree_digest(into) == packed.digest


def test_packing_is_deterministic(tmp_path: Path) -> None:
    folder = code_folder(tmp_path)
    first = pack(files_of(folder), {}, tmp_path / "1.tar.gz")
    os.utime(folder / "app.py", (1, 1))
    second = pack(files_of(folder), {}, tmp_path / "2.tar.gz")
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.digest == second.digest


def test_links_inside_a_folder_are_not_packed(tmp_path: Path) -> None:
    folder = code_folder(tmp_path)
    (folder / "secrets").symlink_to("/etc")
    with pytest.raises(ArchiveError, match="secrets is a symbolic link"):
        files_of(folder)


def _hostile(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    path = tmp_path / "hostile.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if info.isfile():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("/etc/cron.d/x"), "is an absolute path"),
        (_member("../escape.py"), "escapes its folder"),
        (_member("a/../../b.py"), "escapes its folder"),
        (_member("a//b.py"), "escapes its folder"),
        (_member("a\\b.py"), "invalid name"),
        (_member("app.py", tarfile.SYMTYPE, "/etc/passwd"), "'app.py' is a symbolic link"),
        (_member("app.py", tarfile.LNKTYPE, "other"), "'app.py' is a hard link"),
        (_member("tty", tarfile.CHRTYPE), "'tty' is a device"),
        (_member("pipe", tarfile.FIFOTYPE), "'pipe' is a FIFO"),
    ],
)
def test_hostile_members_are_refused_and_nothing_stays(
    tmp_path: Path, member: tarfile.TarInfo, message: str
) -> None:
    archive = _hostile(tmp_path, (_member("fine.py"), b"x = 1\n"), (member, b"boom"))
    into = tmp_path / "out"
    with pytest.raises(ArchiveError, match=message) as refused:
        unpack(archive, into, max_bytes=2**20)
    assert refused.value.status == 400
    assert not into.exists()
    assert not (tmp_path / "escape.py").exists() and not (tmp_path / "b.py").exists()


def test_duplicates_and_too_many_members_are_refused(tmp_path: Path) -> None:
    twice = _hostile(tmp_path, (_member("a.py"), b"1"), (_member("a.py"), b"2"))
    with pytest.raises(ArchiveError, match="appears twice"):
        unpack(twice, tmp_path / "out", max_bytes=2**20)
    many = _hostile(tmp_path, *((_member(f"m{i}.py"), b"") for i in range(5)))
    with pytest.raises(ArchiveError, match="more than 4 members"):
        unpack(many, tmp_path / "out", max_bytes=2**20, max_members=4)


def test_what_unpacks_to_more_than_allowed_is_a_413(tmp_path: Path) -> None:
    archive = _hostile(tmp_path, (_member("a.bin"), b"a" * 600), (_member("b.bin"), b"b" * 600))
    with pytest.raises(ArchiveError, match="more than 1000 bytes") as refused:
        unpack(archive, tmp_path / "out", max_bytes=1000)
    assert refused.value.status == 413
    assert not (tmp_path / "out").exists()


def test_what_is_not_a_gzipped_tar_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"PK\x03\x04 a zip, not a tar")
    with pytest.raises(ArchiveError, match="not a gzip'd tar archive"):
        unpack(garbage, tmp_path / "out", max_bytes=2**20)


def test_setuid_bits_never_reach_the_disk(tmp_path: Path) -> None:
    member = _member("tool")
    member.mode = 0o4755
    archive = _hostile(tmp_path, (member, b"#!/bin/sh\n"))
    unpack(archive, tmp_path / "out", max_bytes=2**20)
    assert stat.S_IMODE((tmp_path / "out" / "tool").stat().st_mode) == 0o755
