"""Environments built once: a model's ``env=`` (requirement lines, or a uv lock) as a
virtualenv made with uv, kept under its content hash and shared by every model that asks for
the same one, across deploys and restarts.

An environment's key is a hash of what it installs (the requirement lines, or the lock and
its project file), the interpreter's version and ketch's version: the same lock on the same
server is one folder, ``ENVS/<key>``, built at most once however many deploys, models or
servers (sharing the store) ask for it. A build happens in a folder of its own beside the
final one and is renamed into place only once it is whole, so nothing half-built is ever
used; a build that fails leaves its log, ``ENVS/<key>.log``, and nothing else.

ketch itself reaches the environment from the server's own installation: the environment's
``site-packages`` gets a ``.pth`` file that appends the server's ``site-packages`` after its
own. The environment's packages come first (the user's pins win), and its workers import the
very ketch the gateway runs, so the two always speak the same protocol; nothing of ketch is
downloaded, which keeps a build offline when the requirements are.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ketch import __version__
from ketch.observability import events

#: The file a finished environment holds: what it was built from. Written last.
MARKER = "ketch-env.json"
#: The ``.pth`` file that makes the server's packages (ketch among them) importable.
SERVER_PATH_FILE = "_ketch_server.pth"
#: Longest a build may take before it is stopped and reported failed.
BUILD_TIMEOUT_S = 900.0
#: Lines of a failed build's log quoted in its error.
LOG_TAIL_LINES = 40

LineSink = Callable[[str], None]


class EnvBuildError(Exception):
    """An environment could not be built; ``log`` is the tail of its build log."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


@dataclass(frozen=True, slots=True)
class EnvRequest:
    """What one environment installs: requirement lines (a requirements file's syntax, so
    ``--find-links`` and ``--index-url`` lines work), or a uv lock with its ``pyproject.toml``.

    :param wheels: local wheel files the requirement lines name by path (a deployed wheel):
        their bytes are part of the key, so a changed wheel builds a new environment.
    """

    requirements: tuple[str, ...] = ()
    lock: bytes | None = None
    project: bytes | None = None
    wheels: tuple[Path, ...] = ()

    @classmethod
    def declared(cls, env: tuple[str, ...] | str) -> EnvRequest:
        """What a declaration's ``env=`` asks for: requirement lines, or a file's path."""
        return cls.from_file(Path(env)) if isinstance(env, str) else cls(requirements=env)

    @classmethod
    def from_file(cls, path: Path) -> EnvRequest:
        """A requirements file, or a ``uv.lock`` with the ``pyproject.toml`` beside it."""
        if path.name == "uv.lock":
            project = path.with_name("pyproject.toml")
            if not project.is_file():
                raise ValueError(f"env={str(path)!r}: a uv.lock needs its pyproject.toml beside it")
            return cls(lock=path.read_bytes(), project=project.read_bytes())
        lines = path.read_text().splitlines()
        return cls(requirements=tuple(line for line in lines if line.strip()))

    def key(self) -> str:
        """The environment's name: a hash of what it installs, on this interpreter and ketch."""
        digest = hashlib.sha256()
        for part in (
            f"python {sys.version}",
            f"ketch {__version__}",
            f"platform {sys.platform} {os.uname().machine}",
            *(f"requirement {line.strip()}" for line in self.requirements),
        ):
            digest.update(part.encode() + b"\0")
        for label, blob in (("lock", self.lock), ("project", self.project)):
            if blob is not None:
                digest.update(label.encode() + b"\0" + hashlib.sha256(blob).digest())
        for wheel in self.wheels:
            digest.update(b"wheel\0" + hashlib.sha256(wheel.read_bytes()).digest())
        return digest.hexdigest()[:24]

    def describe(self) -> str:
        if self.lock is not None:
            return "a uv lock"
        shown = [line for line in self.requirements if not line.startswith("-")]
        return ", ".join(shown) or "no requirements"


@dataclass(frozen=True, slots=True)
class BuiltEnv:
    """A finished environment: its key, its interpreter, and how long its build took."""

    key: str
    folder: Path
    build_s: float

    @property
    def python(self) -> str:
        return str(self.folder / "bin" / "python")


class Environments:
    """The environments of one store folder (``STORE/envs``), built with uv on demand.

    :param root: where environments, their logs and their build folders live.
    :param uv: the uv executable; by default the one installed with ketch.
    """

    def __init__(self, root: Path, uv: str | None = None) -> None:
        self.root = root
        self._uv = uv
        #: One build per key at a time in this process; the lock file covers other processes.
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def log_of(self, key: str) -> Path:
        return self.root / f"{key}.log"

    def find(self, key: str) -> BuiltEnv | None:
        """The finished environment ``key``, if it was built."""
        folder = self.root / key
        marker = folder / MARKER
        if not marker.is_file():
            return None
        build_s = float(json.loads(marker.read_text()).get("build_s", 0.0))
        return BuiltEnv(key, folder, build_s)

    async def ensure(self, request: EnvRequest, on_line: LineSink | None = None) -> BuiltEnv:
        """The environment for ``request``: the one already built, else built now (once, even
        when several callers ask at the same time).

        :param on_line: receives each line of the build's output as it comes.
        :raises EnvBuildError: the build failed; nothing of it is kept but its log.
        """
        key = request.key()
        async with self._locks[key]:
            built = self.find(key)
            if built is not None:
                return built
            self.root.mkdir(parents=True, exist_ok=True)
            async with _file_lock(self.root / f"{key}.lock"):
                built = self.find(key)  # another server sharing the store built it meanwhile
                if built is not None:
                    return built
                return await self._build(key, request, on_line)

    async def _build(self, key: str, request: EnvRequest, on_line: LineSink | None) -> BuiltEnv:
        started = time.monotonic()
        building = self.root / f"{key}.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        log_path = self.log_of(key)
        with log_path.open("w") as log:

            def emit(line: str) -> None:
                log.write(line + "\n")
                log.flush()
                if on_line is not None:
                    on_line(line)

            try:
                await self._install(building, request, emit)
                build_s = time.monotonic() - started
                marker = {"key": key, "describe": request.describe(), "build_s": build_s}
                (building / MARKER).write_text(json.dumps(marker))
                os.rename(building, self.root / key)
                emit(f"ketch: environment {key} built in {build_s:.1f} s")
            except BaseException as exc:
                shutil.rmtree(building, ignore_errors=True)
                if isinstance(exc, EnvBuildError | OSError):
                    emit(f"ketch: build failed: {exc}")
                    raise EnvBuildError(
                        f"cannot build the environment for {request.describe()}: {exc}",
                        _tail(log_path),
                    ) from None
                raise
        return BuiltEnv(key, self.root / key, build_s)

    async def _install(self, folder: Path, request: EnvRequest, emit: LineSink) -> None:
        uv = self._uv or _find_uv()
        cache = self.root / "uv-cache"
        # The base interpreter: a virtualenv made from another virtualenv's python finds no
        # standard library of its own.
        base = getattr(sys, "_base_executable", sys.executable)
        await _run([uv, "venv", "--relocatable", "--python", base, str(folder)], emit, cache)
        spec_folder = folder / "ketch-env"
        spec_folder.mkdir()
        requirements = spec_folder / "requirements.txt"  # kept: what the environment is
        python = str(folder / "bin" / "python")
        if request.lock is not None and request.project is not None:
            # Installed exactly as locked, from the sources the lock names (its project's
            # indexes and find-links), into this environment; the project itself is not.
            (spec_folder / "uv.lock").write_bytes(request.lock)
            (spec_folder / "pyproject.toml").write_bytes(request.project)
            sync = [uv, "sync", "--frozen", "--no-install-project", "--project", str(spec_folder)]
            await _run(sync, emit, cache, {"UV_PROJECT_ENVIRONMENT": str(folder)})
        elif request.requirements:
            requirements.write_text("".join(line + "\n" for line in request.requirements))
            install = [uv, "pip", "install", "--python", python, "-r", str(requirements)]
            await _run(install, emit, cache)
        _add_server_packages(folder)
        await _run([python, "-c", _CHECK_KETCH], emit, cache)


async def ensure_env(
    envs: Environments, request: EnvRequest, report: events.Report, on_line: LineSink
) -> BuiltEnv:
    """``envs.ensure(request)``, telling ``report`` when a build starts and ends."""
    key = request.key()
    if (built := envs.find(key)) is not None:
        on_line(f"ketch: environment {key} is built already")
        return built
    report(events.env_building(key, request.describe()))
    built = await envs.ensure(request, on_line)
    report(events.env_built(key, built.build_s))
    return built


#: Run by the new interpreter: ketch must import, at the server's version.
_CHECK_KETCH = (
    "import ketch, sys; v = ketch.__version__; "
    f"sys.exit(0 if v == {__version__!r} else 'ketch ' + v + ' is not the server\\'s "
    f"{__version__}')"
)


def _add_server_packages(folder: Path) -> None:
    """Let the environment import ketch and what it needs from the server's installation,
    after its own packages (``site.addsitedir`` also runs their ``.pth`` files, which an
    editable install of ketch is made of)."""
    (purelib,) = folder.glob("lib/python*/site-packages")
    ours = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    lines = [f"import site; site.addsitedir({path!r})" for path in ours]
    (purelib / SERVER_PATH_FILE).write_text("\n".join(lines) + "\n")


async def _run(
    argv: Sequence[str], emit: LineSink, cache: Path, extra_env: Mapping[str, str] | None = None
) -> None:
    """Run ``argv``, each output line to ``emit``; EnvBuildError when it fails or overruns.

    :param cache: uv's cache when neither ``UV_CACHE_DIR`` nor a home folder says where
        (a service account without one)."""
    emit("$ " + " ".join(argv))
    env = {**os.environ, "NO_COLOR": "1", "VIRTUAL_ENV": "", **(extra_env or {})}
    if "UV_CACHE_DIR" not in env and not env.get("HOME"):
        env["UV_CACHE_DIR"] = str(cache)
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(BUILD_TIMEOUT_S):
            async for raw in process.stdout:
                emit(raw.decode(errors="replace").rstrip())
            code = await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise EnvBuildError(f"{argv[1]} took more than {BUILD_TIMEOUT_S:.0f} s", "") from None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if code != 0:
        raise EnvBuildError(f"{Path(argv[0]).name} {argv[1]} exited with code {code}", "")


@contextlib.asynccontextmanager
async def _file_lock(path: Path) -> AsyncIterator[None]:
    """An exclusive lock on ``path`` across processes, waited for in a thread."""
    with path.open("a") as handle:
        await asyncio.to_thread(fcntl.flock, handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _find_uv() -> str:
    try:
        from uv import find_uv_bin
    except ImportError:
        found = shutil.which("uv")
        if found is None:
            raise EnvBuildError("uv is not installed: pip install uv", "") from None
        return found
    return str(find_uv_bin())


def _tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    return ""
