"""The archive a deploy travels in: packed by ``ketch deploy`` (a deterministic gzip'd tar),
and unpacked by the server only after each member passed its checks.

The server takes regular files and folders and nothing else: a member whose name is absolute
or escapes the folder, a link, a device, a duplicate, or more bytes or members than allowed is
refused (:class:`ArchiveError`) before it is written, and a refusal leaves nothing behind.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

#: Folders and files never packed: caches, version control, virtualenvs.
SKIPPED_NAMES = frozenset(
    {
        "__pycache__",
        ".git",
        ".hg",
        ".svn",
        ".venv",
        "venv",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".tox",
        ".ipynb_checkpoints",
        ".DS_Store",
    }
)
SKIPPED_SUFFIXES = (".pyc", ".pyo")
_CHUNK = 1 << 20


class ArchiveError(ValueError):
    """An archive the server refuses; ``status`` is the HTTP status to answer (400, or 413
    when it is too large)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Packed:
    """An archive written by :func:`pack`: where, how large, and the digest of its files."""

    path: Path
    size: int
    digest: str


def files_of(path: Path) -> dict[str, Path]:
    """What ``ketch deploy PATH`` packs: a file by its name, or a folder's regular files by
    their POSIX paths relative to it (caches and version control left out)."""
    if path.is_symlink():
        raise ArchiveError(f"{path} is a symbolic link: links are not packed")
    if path.is_file():
        return {path.name: path}
    if not path.is_dir():
        raise ArchiveError(f"no such file or folder: {path}")
    found: dict[str, Path] = {}
    for folder, folders, files in os.walk(path):
        folders[:] = sorted(name for name in folders if name not in SKIPPED_NAMES)
        for name in [*folders, *files]:
            if (Path(folder) / name).is_symlink():
                link = Path(folder) / name
                raise ArchiveError(f"{link} is a symbolic link: links are not packed")
        for name in sorted(files):
            if name in SKIPPED_NAMES or name.endswith(SKIPPED_SUFFIXES):
                continue
            local = Path(folder) / name
            found[local.relative_to(path).as_posix()] = local
    if not found:
        raise ArchiveError(f"{path} holds no file to deploy")
    return found


def pack(files: Mapping[str, Path], extra: Mapping[str, bytes], out: Path) -> Packed:
    """Write ``files`` (archive name -> local file) and ``extra`` (archive name -> content) as
    a gzip'd tar at ``out``: sorted, with no times, owners or modes but executable or not, so
    the same code gives the same bytes."""
    clash = set(files) & set(extra)
    if clash:
        raise ValueError(f"packed twice: {sorted(clash)}")
    entries: list[tuple[str, bool, bytes]] = [
        (name, bool(local.stat().st_mode & stat.S_IXUSR), local.read_bytes())
        for name, local in files.items()
    ]
    entries += [(name, False, content) for name, content in extra.items()]
    entries.sort()
    with out.open("wb") as raw:
        # No time or file name in the gzip header either: the same code gives the same bytes.
        with gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as zipped:
            with tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name, executable, content in entries:
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(content), _mode(executable), 0
                    tar.addfile(info, io.BytesIO(content))
    triples = ((name, x, hashlib.sha256(content).hexdigest()) for name, x, content in entries)
    return Packed(out, out.stat().st_size, _digest(triples))


def unpack(archive: Path, into: Path, *, max_bytes: int, max_members: int = 10_000) -> list[str]:
    """Extract the gzip'd tar ``archive`` into the new folder ``into``, refusing anything
    unsafe before it is written (see the module docstring); the files' names, sorted."""
    if into.exists() and any(into.iterdir()):
        raise ValueError(f"{into} is not empty")
    into.mkdir(parents=True, exist_ok=True)
    try:
        return _extract(archive, into, max_bytes, max_members)
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise


def _extract(archive: Path, into: Path, max_bytes: int, max_members: int) -> list[str]:
    names: set[str] = set()
    files: list[str] = []
    total = 0
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            for count, member in enumerate(tar, start=1):
                if count > max_members:
                    raise ArchiveError(f"the archive has more than {max_members} members")
                name = _checked_name(member.name)
                if name in names:
                    raise ArchiveError(f"archive member {name!r} appears twice")
                names.add(name)
                target = into / name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    os.chmod(target, 0o755)
                    continue
                if not member.isfile():
                    raise ArchiveError(
                        f"archive member {name!r} is a {_kind(member)}: only files and folders "
                        "are taken (links are refused)"
                    )
                total += member.size
                if total > max_bytes:
                    raise ArchiveError(_too_large(max_bytes), 413)
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has one
                target.parent.mkdir(parents=True, exist_ok=True)
                written = _copy(source, target, max_bytes - (total - member.size))
                if written != member.size:
                    raise ArchiveError(f"archive member {name!r} is cut short")
                os.chmod(target, _mode(bool(member.mode & stat.S_IXUSR)))
                files.append(name)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, ArchiveError):
            raise
        raise ArchiveError(f"not a gzip'd tar archive: {exc}") from None
    return sorted(files)


def _copy(source: IO[bytes], target: Path, allowed: int) -> int:
    written = 0
    with target.open("wb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > allowed:
                raise ArchiveError("the archive unpacks to more than allowed", 413)
            out.write(chunk)
    return written


def _checked_name(name: str) -> str:
    """The member's name when it stays inside the folder: relative, no '..', no oddities."""
    if not name or "\0" in name or "\\" in name:
        raise ArchiveError(f"archive member {name!r} has an invalid name")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise ArchiveError(f"archive member {name!r} is an absolute path")
    parts = name.rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ArchiveError(f"archive member {name!r} escapes its folder ('..' or empty parts)")
    return "/".join(parts)


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "FIFO"
    return "special file"


def _too_large(max_bytes: int) -> str:
    return (
        f"the archive unpacks to more than {max_bytes} bytes, more than this server takes "
        "(ketch serve --max-deploy-mb)"
    )


def _mode(executable: bool) -> int:
    return 0o755 if executable else 0o644


def tree_digest(folder: Path) -> str:
    """A content hash of a folder's regular files (path, executable bit, sha256 of the bytes,
    in path order): the same code has the same digest whatever archive carried it."""
    triples = []
    for local in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        content = hashlib.sha256(local.read_bytes()).hexdigest()
        executable = bool(local.stat().st_mode & stat.S_IXUSR)
        triples.append((local.relative_to(folder).as_posix(), executable, content))
    return _digest(triples)


def _digest(triples: Iterable[tuple[str, bool, str]]) -> str:
    digest = hashlib.sha256()
    for name, executable, content in sorted(triples):
        digest.update(f"{name}\0{'x' if executable else '-'}\0{content}\n".encode())
    return digest.hexdigest()
