"""The archive a deploy travels in: packed by ``ketch deploy PATH`` (the same code, the same
bytes), unpacked by ``POST /admin/deployments`` refusing all but plain files and folders."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import IO

#: Folders and files never packed: caches, VCS, virtualenvs.
SKIPPED_NAMES: frozenset[str] = frozenset(
    "__pycache__ .git .hg .svn .venv venv .mypy_cache .pytest_cache .ruff_cache .tox"
    " .ipynb_checkpoints .DS_Store".split()
)
SKIPPED_SUFFIXES: tuple[str, ...] = (".pyc", ".pyo")

CHUNK = 1 << 16
#: What a member may add to the decompressed stream besides its content: its header, padding,
#: and the pax or GNU header of a long name (one of PATH_MAX, 4096, fits well).
MEMBER_OVERHEAD = 8 * 1024
_KINDS = {
    tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.FIFOTYPE: "a FIFO",
    tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
}  # fmt: skip
#: What tarfile, gzip and zlib raise on a bad stream (ValueError: on a bad pax number).
_CORRUPT = (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error, ValueError)


class ArchiveError(ValueError):
    """An archive the server refuses; ``status`` is the HTTP status to answer (413: too large)."""

    status: int

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def files_of(path: Path) -> dict[str, Path]:
    """What ``ketch deploy PATH`` packs: a file by its name, or every regular file under a
    folder by its POSIX path relative to it, caches and VCS left out. Links inside are refused."""
    if path.is_file():
        return {path.name: path}
    if not path.is_dir():
        raise ArchiveError(f"nothing to pack: {path} is not a file or a folder")
    if not (files := dict(_walk(path, path, packing=True))):
        raise ArchiveError(f"nothing to pack: {path} holds no files")
    return files


def _walk(root: Path, folder: Path, *, packing: bool) -> Iterator[tuple[str, Path]]:
    """The regular files under ``folder`` by POSIX path relative to ``root``, in name order."""
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        # Skipped before the link check: a virtualenv is often a link, and is never packed.
        if packing and (entry.name in SKIPPED_NAMES or entry.name.endswith(SKIPPED_SUFFIXES)):
            continue
        path = Path(entry.path)
        if entry.is_symlink():
            if packing:  # the server would refuse it; hashing counts regular files only
                raise ArchiveError(f"links are not packed: {path} is a symbolic link")
        elif entry.is_dir(follow_symlinks=False):
            yield from _walk(root, path, packing=packing)
        elif entry.is_file(follow_symlinks=False):
            yield path.relative_to(root).as_posix(), path
        # Sockets, FIFOs and devices have no content to ship: left behind.


@dataclass(frozen=True, slots=True)
class Packed:
    """An archive :func:`pack` wrote: where, its size in bytes, the digest of what it holds."""

    path: Path
    size: int
    digest: str


def pack(files: Mapping[str, Path], extra: Mapping[str, bytes], out: Path) -> Packed:
    """Write a gzip'd tar of ``files`` (archive name -> local file) and ``extra`` (archive name
    -> content) to ``out``, deterministically: the same code gives the same bytes."""
    if both := files.keys() & extra.keys():
        raise ValueError(f"names given both as a file and as content: {sorted(both)}")
    names = sorted([*files, *extra])
    for name in names:
        _check_name(name)  # never send what the server would refuse
    entries: list[tuple[str, bool, str]] = []
    try:
        # No file name nor mtime in the gzip header; PAX keeps long names whole.
        with (
            out.open("wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for name in names:
                if name not in files:
                    entries.append(_add(tar, name, io.BytesIO(extra[name]), len(extra[name]), 0))
                    continue
                with files[name].open("rb") as source:
                    status = os.fstat(source.fileno())
                    entries.append(_add(tar, name, source, status.st_size, status.st_mode))
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return Packed(out, out.stat().st_size, _digest(entries))


def _add(
    tar: tarfile.TarFile, name: str, source: IO[bytes], size: int, mode: int
) -> tuple[str, bool, str]:
    """Add a file with nothing of the machine in its header (no owner, no time)."""
    executable = bool(mode & stat.S_IXUSR)  # by its owner, as the digest counts it
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o755 if executable else 0o644
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    reader = _Reader(source, size)  # hashes the bytes packed, even if the file changes meanwhile
    tar.addfile(info, reader)
    return name, executable, reader.hash.hexdigest()


def tree_digest(folder: Path) -> str:
    """A content hash of a folder's regular files: their paths, executable bits and contents.
    The server stores each deploy under it, so the same code deployed twice is stored once."""
    entries: list[tuple[str, bool, str]] = []
    for name, path in _walk(folder, folder, packing=False):
        with path.open("rb") as source:
            content = hashlib.file_digest(source, "sha256").hexdigest()
            entries.append((name, bool(os.fstat(source.fileno()).st_mode & stat.S_IXUSR), content))
    return _digest(entries)


def _digest(entries: Iterable[tuple[str, bool, str]]) -> str:
    """The digest of (name, executable, content sha256) triples: pack's and tree_digest's."""
    total = hashlib.sha256()
    for name, executable, content in sorted(entries):
        total.update(f"{name}\0{'x' if executable else '-'}\0{content}\n".encode())
    return total.hexdigest()


class _Reader(io.RawIOBase):
    """A stream read through, hashed, and refused past ``limit`` bytes: unpacking caps the
    decompressed stream with it, since tarfile reads headers (a pax one of any size) in memory."""

    def __init__(self, source: IO[bytes], limit: int) -> None:
        super().__init__()
        self.source, self.left, self.hash = source, limit, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        chunk = self.source.read(size if size >= 0 else CHUNK)
        self.left -= len(chunk)
        if self.left < 0:
            raise ArchiveError("the archive's headers and padding are too large", 413)
        self.hash.update(chunk)
        return chunk


def unpack(archive: Path, into: Path, *, max_bytes: int, max_members: int = 10_000) -> list[str]:
    """Extract a gzip'd tar into ``into`` (created, or empty), refusing with ArchiveError any
    member but a plain file or folder inside it before writing it, and archives over
    ``max_bytes`` or ``max_members`` (413); nothing stays after a refusal. Returns the files."""
    created = not (into.exists() or into.is_symlink())
    if not created and (into.is_symlink() or not into.is_dir() or os.listdir(into)):
        raise FileExistsError(f"cannot unpack into {into}: it is not an empty folder")
    into.mkdir(parents=True, exist_ok=True)
    try:
        return _extract(archive, into.resolve(), max_bytes, max_members)
    except BaseException as error:
        for child in [into] if created else list(into.iterdir()):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        if isinstance(error, _CORRUPT) and not isinstance(error, ArchiveError):
            raise ArchiveError(f"not a gzip'd tar archive: {error}") from error
        raise


def _extract(archive: Path, root: Path, max_bytes: int, max_members: int) -> list[str]:
    limit = max_bytes + (max_members + 2) * MEMBER_OVERHEAD + 2 * tarfile.RECORDSIZE
    seen: dict[str, bool] = {}  # member name -> whether it is a folder
    folders: set[str] = set()  # the ones created: members, and the ones their names imply
    total = 0
    with archive.open("rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
        stream = _Reader(gz, limit)  # type: ignore[arg-type]
        # Streaming ("r|"): members come in order, each checked before anything of it is written.
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for count, member in enumerate(tar, start=1):
                if count > max_members:
                    raise ArchiveError(f"the archive has more than {max_members} members", 413)
                _check_member(member)
                target = _claim(root, member.name, member.isdir(), seen, folders)
                if member.isdir():
                    continue
                if total + member.size > max_bytes:  # the header's word first, then the bytes
                    raise _too_large(max_bytes)
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has a stream
                total = _write(source, target, member.mode, total, max_bytes)
        # GzipFile checks the CRC and length only at the end: read it all, so that a truncated
        # or tampered upload is refused rather than unpacked in part.
        while stream.read(CHUNK):
            pass
    return sorted(name for name, is_dir in seen.items() if not is_dir)


def _too_large(max_bytes: int) -> ArchiveError:
    return ArchiveError(f"the archive unpacks to more than {max_bytes} bytes", 413)


def _check_name(name: str) -> None:
    why = None
    if "\0" in name or "\\" in name:
        why = "has a NUL or a backslash in its name"
    elif name.startswith("/") or PureWindowsPath(name).drive:
        why = "is an absolute path"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        why = "has an empty, '.' or '..' component"
    if why:
        raise ArchiveError(f"archive member {name!r} {why}")


def _check_member(member: tarfile.TarInfo) -> None:
    _check_name(member.name)
    if not (member.isdir() or member.type in (tarfile.REGTYPE, tarfile.AREGTYPE)):
        kind = _KINDS.get(member.type, f"of type {member.type!r}")
        links = member.issym() or member.islnk()
        why = "links are refused" if links else "only regular files and folders are unpacked"
        raise ArchiveError(f"archive member {member.name!r} is {kind}: {why}")
    if member.size < 0:
        raise ArchiveError(f"archive member {member.name!r} has a negative size")


def _claim(root: Path, name: str, is_dir: bool, seen: dict[str, bool], folders: set[str]) -> Path:
    """Check ``name`` is new and not both a file and a folder, create the folders it needs
    (0o755, whatever the umask) and return its path."""
    if name in seen:
        raise ArchiveError(f"archive member {name!r} appears twice")
    parts = name.split("/")
    parents = ["/".join(parts[:end]) for end in range(1, len(parts))]
    clash = next((parent for parent in parents if seen.get(parent) is False), None)
    if clash is not None or (not is_dir and name in folders):
        raise ArchiveError(f"archive member {clash or name!r} is both a file and a folder")
    target = root.joinpath(*parts)
    if not target.resolve().is_relative_to(root):
        raise ArchiveError(f"archive member {name!r} escapes the folder it is unpacked into")
    seen[name] = is_dir
    for folder in [*parents, name] if is_dir else parents:
        if folder not in folders:
            (root / folder).mkdir()
            (root / folder).chmod(0o755)
            folders.add(folder)
    return target


def _write(source: IO[bytes], target: Path, mode: int, total: int, max_bytes: int) -> int:
    """Copy a member's bytes to a new file, counted against ``max_bytes`` as they come (the
    header's size is not trusted); returns the running total."""
    mode = 0o755 if mode & stat.S_IXUSR else 0o644  # never setuid, setgid or sticky
    # O_EXCL | O_NOFOLLOW: never overwrite anything, never write through a link.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with open(fd, "wb") as out:
        os.fchmod(fd, mode)  # the umask may have cleared bits
        while chunk := source.read(CHUNK):
            total += len(chunk)
            if total > max_bytes:
                raise _too_large(max_bytes)
            out.write(chunk)
    return total
