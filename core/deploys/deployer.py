"""One deploy, from an uploaded archive to models that answer: unpack, store, build the
environment, find the models, start them as a new version, and keep the record.

A deploy runs in the background once its archive is accepted (``POST /admin/deployments``
answers 202 with the version it will be); its progress and build log are read from
:class:`DeployState` (``GET /admin/deployments/{name}/versions/{version}``). Each of its steps
can fail, and a failure leaves nothing served: the models it started are released and no
record is written. Deploys of one name run one at a time.

Every model the code declares is served under the deploy's version number: a decorated
function through the ``python`` runtime (its artifact is the stored file and the function's
name), a ``ketch.deploy(...)`` through its own runtime, both under the environment's
interpreter. A version of a model already served takes no traffic until it is rolled to
(``ketch models roll``), as with ``POST /admin/models``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec

from ketch.deploys.archive import ArchiveError, tree_digest, unpack
from ketch.deploys.store import DeploymentRecord, Store
from ketch.errors import TargetLoadError
from ketch.observability import events
from ketch.plugin_manager import Plugins
from ketch.pools.discovery import discover
from ketch.pools.envs import (
    BuiltEnv,
    EnvBuildError,
    Environments,
    EnvRequest,
    ensure_env,
)
from ketch.pools.scaling import PoolManager
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import PredictionError
from ketch.specs.env_scan import declared_envs
from ketch.specs.models import ModelSpec

log = logging.getLogger("ketch.deploys")

#: The manifest every archive carries at its top (``ketch deploy`` writes it).
MANIFEST = "ketch-deploy.json"
#: What a deployment may be called: it names a folder of the store and a route segment.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Lines of a deploy's log kept in memory for its status.
LOG_LINES_KEPT = 2000

State = Literal["building", "starting", "ready", "failed", "removed"]


class DeployedModel(msgspec.Struct, frozen=True, kw_only=True):
    """A model a deploy serves, and where to call it."""

    name: str
    version: str
    predict: str
    infer: str


class DeploymentStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One deployed version as the API shows it.

    :param state: ``building`` (its environment), ``starting`` (its models' first workers),
        ``ready``, or ``failed`` (see ``error``).
    :param env: its environment's key; None: the server's own.
    :param env_cached: whether the environment was built already (None: none needed yet).
    :param env_build_s: how long the environment's build took (when it was built).
    :param ready_s: seconds from the upload to ready.
    :param log_tail: the last lines of its log (in a single version's answer).
    """

    name: str
    version: int
    digest: str
    state: State
    error: str | None
    env: str | None
    env_cached: bool | None
    env_build_s: float | None
    started_at: float
    ready_s: float | None
    models: list[DeployedModel]
    log_tail: list[str] | None = None


class Manifest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What ``ketch deploy`` says of the code it sends.

    :param name: the deployment's name.
    :param entry: what declares the models: a ``.py`` file of the code, or with a wheel, the
        module to import.
    :param requirements: requirement lines of its environment.
    :param lock: the code's ``uv.lock`` (with ``pyproject.toml`` beside it), as its path.
    :param wheel: the wheel sent as the code, as its path: installed into the environment.
    """

    name: str
    entry: str
    requirements: tuple[str, ...] | None = None
    lock: str | None = None
    wheel: str | None = None


class DeployError(Exception):
    """A deploy refused or failed: ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class DeployState:
    """Where one deploy is: what ``GET /admin/deployments/{name}/versions/{version}`` shows."""

    name: str
    version: int
    digest: str
    state: State = "building"
    error: str | None = None
    env: str | None = None
    env_cached: bool | None = None
    env_build_s: float | None = None
    models: list[ModelSpec] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    ready_s: float | None = None
    log: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES_KEPT))
    #: Lines said so far (the log keeps the last LOG_LINES_KEPT of them).
    said: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _news: asyncio.Event = field(default_factory=asyncio.Event)

    def say(self, line: str) -> None:
        self.log.append(line)
        self.said += 1
        self._wake()

    def finish(self) -> None:
        self.done.set()
        self._wake()

    def _wake(self) -> None:
        news, self._news = self._news, asyncio.Event()
        news.set()

    async def follow(self) -> AsyncIterator[str]:
        """The log's lines, then each new one as it is said, until the deploy is done."""
        sent = max(0, self.said - len(self.log))
        while True:
            news = self._news
            first_kept = self.said - len(self.log)
            for line in list(self.log)[max(0, sent - first_kept) :]:
                yield line
            sent = self.said
            if self.done.is_set():
                return
            await news.wait()

    def describe(self, log_lines: int = 0) -> DeploymentStatus:
        """The API's view; with the last ``log_lines`` lines of the log."""
        return DeploymentStatus(
            name=self.name,
            version=self.version,
            digest=self.digest,
            state=self.state,
            error=self.error,
            env=self.env,
            env_cached=self.env_cached,
            env_build_s=self.env_build_s,
            started_at=self.started_at,
            ready_s=self.ready_s,
            models=[_endpoint(spec) for spec in self.models],
            log_tail=list(self.log)[-log_lines:] if log_lines else None,
        )


def _endpoint(spec: ModelSpec) -> DeployedModel:
    return DeployedModel(
        name=spec.name,
        version=spec.version,
        predict=f"/models/{spec.name}/predict",
        infer=f"/v2/models/{spec.name}/versions/{spec.version}/infer",
    )


class Deployer:
    """The deploys of one server: its store, its environments, and the pools it starts
    deployed models in.

    :param workers_per_model: ``ketch serve --workers-per-model``, applied to deployed models
        as to the served file's.
    """

    def __init__(
        self,
        store: Store,
        envs: Environments,
        plugins: Plugins,
        pools: PoolManager,
        dispatcher: Dispatcher,
        report: events.Report,
        workers_per_model: int = 0,
    ) -> None:
        self.store = store
        self.envs = envs
        self._plugins = plugins
        self._pools = pools
        self._dispatcher = dispatcher
        self._report = report
        self._workers_per_model = workers_per_model
        self._states: dict[tuple[str, int], DeployState] = {}
        self._name_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- at start ---------------------------------------------------------------------------

    async def restore(self) -> list[DeploymentRecord]:
        """Serve again every version the store holds, with its environment (built again only
        if it went missing) and the default version it was rolled to; the store was opened."""
        records = self.store.records()
        for record in records:
            state = DeployState(record.name, record.version, record.digest)
            try:
                built = await self._env_of_record(record, state)
            except EnvBuildError as exc:
                log.error("cannot serve %s version %d again: %s", record.name, record.version, exc)
                continue
            specs = [self._under(spec, built) for spec in record.models]
            for spec in specs:
                if not self._dispatcher.has_model(spec.key):
                    self._pools.manage(spec)
            state.models, state.state, state.env = specs, "ready", record.env
            state.finish()
            self._states[(record.name, record.version)] = state
        for name in {spec.name for record in records for spec in record.models}:
            default = self.store.default_of(name)
            if default is not None and default in self._dispatcher.versions(name):
                self._dispatcher.set_default(name, default)
        return records

    async def _env_of_record(self, record: DeploymentRecord, state: DeployState) -> BuiltEnv | None:
        if record.env is None:
            return None
        built = self.envs.find(record.env)
        if built is not None:
            return built
        tree = self.store.code_folder(record.digest)
        request = self._env_request(_read_manifest(tree), tree)
        return await self._build_env(request, state) if request is not None else None

    # -- a deploy ---------------------------------------------------------------------------

    async def accept(self, archive: Path, max_bytes: int) -> DeployState:
        """Check and store an uploaded archive, and start deploying it in the background;
        the state says which version it will be. The unpacking runs in a thread: a large
        archive must not stall the requests the gateway is serving.

        :raises DeployError: the archive or its manifest is refused (nothing is kept).
        """
        manifest, digest, stored = await asyncio.to_thread(self._store, archive, max_bytes)
        state = DeployState(manifest.name, self._next_version(manifest.name), digest)
        self._states[(state.name, state.version)] = state
        task = asyncio.create_task(self._deploy(state, manifest, stored), name="ketch-deploy")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return state

    def _store(self, archive: Path, max_bytes: int) -> tuple[Manifest, str, Path]:
        """Unpack ``archive``, check its manifest and keep its code under its digest."""
        tree = archive.with_suffix(".files")
        try:
            unpack(archive, tree, max_bytes=max_bytes)
        except ArchiveError as exc:
            raise DeployError(str(exc), exc.status) from None
        finally:
            archive.unlink(missing_ok=True)
        try:
            manifest = _read_manifest(tree)
            self._check_entry(manifest, tree)
        except DeployError:
            shutil.rmtree(tree, ignore_errors=True)
            raise
        digest = tree_digest(tree)
        return manifest, digest, self.store.adopt(tree, digest)

    def _next_version(self, name: str) -> int:
        taken = [version for (n, version) in self._states if n == name]
        taken += [r.version for r in self.store.records() if r.name == name]
        taken += [int(v) for v in self._dispatcher.versions(name) if v.isdigit()]
        return max(taken, default=0) + 1

    def _check_entry(self, manifest: Manifest, tree: Path) -> None:
        if manifest.wheel is not None:
            if not (tree / manifest.wheel).is_file():
                raise DeployError(
                    f"the manifest names wheel {manifest.wheel!r}, not in the archive"
                )
            return
        entry = tree / manifest.entry
        if not manifest.entry.endswith(".py") or not entry.is_file():
            raise DeployError(
                f"the manifest's entry {manifest.entry!r} is not a .py file of the archive"
            )

    async def _deploy(self, state: DeployState, manifest: Manifest, tree: Path) -> None:
        try:
            async with self._name_locks[state.name]:
                await self._build_and_start(state, manifest, tree)
        except (DeployError, EnvBuildError, TargetLoadError, PredictionError, ValueError) as exc:
            self._fail(state, str(exc))
        except Exception as exc:
            log.exception("deploy of %s version %d failed", state.name, state.version)
            self._fail(state, f"{type(exc).__name__}: {exc}")
        finally:
            state.finish()

    async def _build_and_start(self, state: DeployState, manifest: Manifest, tree: Path) -> None:
        request = self._env_request(manifest, tree)
        built = await self._build_env(request, state) if request is not None else None
        source = manifest.entry if manifest.wheel is not None else str(tree / manifest.entry)
        state.say(f"ketch: importing {manifest.entry} to find its models")
        python = built.python if built is not None else None
        served = await asyncio.get_running_loop().run_in_executor(
            None, discover, source, self._plugins, python
        )
        specs = [self._as_version(spec, source, state.version, built) for spec in served.models]
        if served.apps:
            names = ", ".join(app.name for app in served.apps)
            state.say(
                f"ketch: applications are not deployed ({names}): add them over the deployed "
                "models with ketch apps add"
            )
        if served.pipelines:
            names = ", ".join(pipeline.name for pipeline in served.pipelines)
            state.say(
                f"ketch: pipelines are not deployed ({names}): declare them in the served file"
            )
        for spec in specs:
            if self._dispatcher.has_model(spec.key):
                raise DeployError(
                    f"model {spec.label()!r} is already served, and this deploy would be its "
                    f"version {spec.version} too: deploy under the model's name (ketch deploy "
                    f"--name {spec.name}) so that the deploy's versions follow the model's",
                    409,
                )
        state.state, state.models = "starting", specs
        for spec in specs:
            self._dispatcher.pin_default(spec.name)
            self._pools.manage(spec)
            self._report(events.model_added(spec, self._dispatcher.default_version(spec.name)))
        state.say(f"ketch: starting {', '.join(spec.label() for spec in specs)}")
        for spec in specs:
            queue = self._dispatcher.queue_for(spec.name, spec.version)
            await queue.wait_ready(spec.pool.cold_start_timeout_s)
        record = DeploymentRecord(
            name=state.name,
            version=state.version,
            digest=state.digest,
            entry=manifest.entry,
            env=state.env,
            env_describe=request.describe() if request is not None else None,
            models=tuple(specs),
        )
        self.store.save(record)
        state.state, state.ready_s = "ready", time.time() - state.started_at
        state.say(f"ketch: ready in {state.ready_s:.1f} s")
        self._report(events.deployed(state.name, state.version, [s.label() for s in specs]))

    def _env_request(self, manifest: Manifest, tree: Path) -> EnvRequest | None:
        """The environment the manifest asks for, else the one the code's ``env=`` declares;
        None: the server's own."""
        if manifest.lock is not None:
            return EnvRequest.from_file(tree / manifest.lock)
        lines = list(manifest.requirements or ())
        wheels: tuple[Path, ...] = ()
        if manifest.wheel is not None:
            wheel = tree / manifest.wheel
            lines.append(str(wheel))
            wheels = (wheel,)
        if lines:
            return EnvRequest(requirements=tuple(lines), wheels=wheels)
        if manifest.wheel is None:
            declared = declared_envs(str(tree / manifest.entry))
            if len(declared) > 1:
                raise DeployError(
                    f"{manifest.entry} declares {len(declared)} different env=; the models of "
                    "one deploy share one environment"
                )
            if declared:
                return EnvRequest.declared(declared[0])
        return None

    async def _build_env(self, request: EnvRequest, state: DeployState) -> BuiltEnv:
        state.env = request.key()
        state.env_cached = self.envs.find(state.env) is not None
        built = await ensure_env(self.envs, request, self._report, state.say)
        state.env_build_s = built.build_s
        return built

    def _as_version(
        self, spec: ModelSpec, source: str, version: int, built: BuiltEnv | None
    ) -> ModelSpec:
        """A discovered model as this deploy serves it: under the deploy's version, loaded by
        its runtime (a decorated function by the ``python`` runtime, from the stored code)."""
        if not spec.deployed:
            spec = msgspec.structs.replace(
                spec,
                runtime="python",
                artifact=f"{source}:{spec.name}",
                options={"version": spec.version},
            )
        spec = msgspec.structs.replace(
            spec,
            version=str(version),
            pool=spec.pool.with_floor(self._workers_per_model),
        )
        return self._under(spec, built)

    @staticmethod
    def _under(spec: ModelSpec, built: BuiltEnv | None) -> ModelSpec:
        python = built.python if built is not None else None
        return msgspec.structs.replace(
            spec, start=msgspec.structs.replace(spec.start, python=python)
        )

    def _fail(self, state: DeployState, error: str) -> None:
        state.state, state.error = "failed", error
        state.say(f"ketch: deploy failed: {error}")
        for spec in state.models:
            if self._dispatcher.has_model(spec.key):
                queue = self._dispatcher.remove_model(spec.key, f"the deploy failed: {error}")
                self._pools.release(queue, f"model {spec.label()!r}: the deploy failed")
        self._report(events.deploy_failed(state.name, state.version, error))

    # -- what the routes read and change ----------------------------------------------------

    def states(self) -> list[DeployState]:
        return sorted(self._states.values(), key=lambda s: (s.name, s.version))

    def state_of(self, name: str, version: int) -> DeployState:
        state = self._states.get((name, version))
        if state is None or state.state == "removed":
            raise DeployError(f"no deployment {name!r} version {version}", 404)
        return state

    def versions_of(self, name: str) -> list[DeployState]:
        found = [s for s in self.states() if s.name == name and s.state != "removed"]
        if not found:
            raise DeployError(f"no deployment {name!r}", 404)
        return found

    def forget(self, state: DeployState) -> None:
        """The state's models were removed: drop its record (and its code, once unused)."""
        self.store.delete(state.name, state.version)
        state.state = "removed"
        self._report(events.deployment_removed(state.name, state.version))

    def rolled(self, name: str, version: str) -> None:
        """Requests without a version now go to ``version``: remembered for restarts when
        the model is a deployed one."""
        if any(spec.name == name for s in self._states.values() for spec in s.models):
            self.store.remember_default(name, version)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _read_manifest(tree: Path) -> Manifest:
    path = tree / MANIFEST
    if not path.is_file():
        raise DeployError(f"the archive has no {MANIFEST} at its top (ketch deploy writes it)")
    try:
        manifest = msgspec.json.decode(path.read_bytes(), type=Manifest)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DeployError(f"{MANIFEST}: {exc}") from None
    if not NAME.match(manifest.name):
        raise DeployError(
            f"deployment name {manifest.name!r}: letters, digits, '_', '.', '-', at most 64"
        )
    if manifest.lock is not None and manifest.requirements is not None:
        raise DeployError(f"{MANIFEST}: give requirements or a lock, not both")
    return manifest
