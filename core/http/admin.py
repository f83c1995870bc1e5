"""The management API under ``/admin``: change a running server without restarting it.

Models: list them, add one from a runtime artifact, remove one (its queued requests finish
first), set a pool's replica bounds, apply a plan ``ketch plan`` wrote (batch sizes, delays,
replicas, threads and tuners: :mod:`ketch.planning.applied`), and roll requests without a
version forward or back to another version (the target gets a ready worker before any request
is sent to it, and requests already queued on the previous version finish there: none fails
for the switch).
Applications: list, add, remove, link and unlink models, change the policy and its params.
Pipelines: add one (``POST /admin/pipelines``); it is listed and removed as an application.

Each route checks its request and submits what it asks for as a change
(:mod:`ketch.http.admin_changes`): applied at once by one gateway, and by every gateway in the
same order when they share a Redis (``--state``), so that all of them serve the same models
and applications. A lone gateway's changes apply to the running server only; the served file
and ``--model`` arguments are what a restart serves (with ``--state``, see
:mod:`ketch.http.shared_changes`). Changes to one model apply one at a time, as do changes to
applications, so a removal cannot race a roll of the same model. Every route needs the admin token
(:mod:`ketch.http.auth`). ``ketch models ...`` and ``ketch apps ...``
(:mod:`ketch.cli.admin_client`) call these routes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ketch.applications.catalog import Applications
from ketch.errors import AppError
from ketch.http.admin_changes import (
    AppAdded,
    AppChanged,
    AppLinked,
    AppRemoved,
    AppUnlinked,
    Changes,
    ModelAdded,
    PipelineAdded,
    PlanApplied,
    PoolSet,
    Rolled,
    VersionsRemoved,
)
from ketch.http.admin_shapes import (
    AddApp,
    AddModel,
    AddPipeline,
    AppChange,
    Link,
    PoolChange,
    Roll,
    given,
)
from ketch.http.endpoints import Endpoints, decode_body, json_response
from ketch.observability import events
from ketch.planning.applied import Plan, planned_spec, tuner_of
from ketch.plugin_manager import Plugins
from ketch.pools.scaling import PoolManager
from ketch.serving import status
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import PredictionError
from ketch.serving.queue import ModelQueue
from ketch.serving.status import ModelStatus
from ketch.specs.apps import AppSpec
from ketch.specs.deployments import declared_deployment
from ketch.specs.models import ModelSpec
from ketch.specs.pipelines import PipelineSpec


class Admin:
    """The ``/admin`` routes over a server's dispatcher, pools and applications.

    :param changes: where the routes submit their changes; the admin applies those of models
        and applications.
    :param plugins: the server's plugins, whose runtimes check the models added.
    :param request_timeout_s: the server's request timeout: the longest a removed model's
        queued requests can take to finish.
    :param workers_per_model: ``ketch serve --workers-per-model``, applied to added models
        as to the served file's.
    :param on_roll: told each model and version rolled to (the deployer remembers it).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        pools: PoolManager,
        apps: Applications,
        changes: Changes,
        plugins: Plugins,
        report: events.Report,
        request_timeout_s: float,
        workers_per_model: int = 0,
        on_roll: Callable[[str, str], None] | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._changes = changes
        self._plugins = plugins
        self._pools = pools
        self._apps = apps
        self._report = report
        self._request_timeout_s = request_timeout_s
        self._workers_per_model = workers_per_model
        self._on_roll = on_roll
        #: One change at a time per model (a removal cannot race a roll of it), and one at a
        #: time to the applications; a slow roll of one model holds up no other change.
        self._model_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._apps_lock = asyncio.Lock()
        changes.handle(ModelAdded, self._add_model)
        changes.handle(VersionsRemoved, self._remove_versions)
        changes.handle(PoolSet, self._set_pool)
        changes.handle(PlanApplied, self._apply_plan)
        changes.handle(Rolled, self._roll)
        changes.handle(AppAdded, self._add_app)
        changes.handle(PipelineAdded, self._add_pipeline)
        changes.handle(AppRemoved, self._remove_app)
        changes.handle(AppChanged, self._change_app)
        changes.handle(AppLinked, self._link)
        changes.handle(AppUnlinked, self._unlink)

    def routes(self, endpoints: Endpoints) -> list[Route]:
        model = "/admin/models/{name}"
        version = model + "/versions/{version}"
        app = "/admin/apps/{name}"
        return [
            endpoints.route("/admin/models", self.list_models, ["GET"]),
            endpoints.route("/admin/models", self.add_model, ["POST"]),
            endpoints.route(model, self.remove_model, ["DELETE"]),
            endpoints.route(version, self.remove_model, ["DELETE"]),
            endpoints.route(model + "/pool", self.set_pool, ["PATCH"]),
            endpoints.route(version + "/pool", self.set_pool, ["PATCH"]),
            endpoints.route(model + "/roll", self.roll, ["POST"]),
            endpoints.route("/admin/plan", self.apply_plan, ["POST"]),
            endpoints.route("/admin/apps", self.list_apps, ["GET"]),
            endpoints.route("/admin/apps", self.add_app, ["POST"]),
            endpoints.route("/admin/pipelines", self.add_pipeline, ["POST"]),
            endpoints.route(app, self.change_app, ["PATCH"]),
            endpoints.route(app, self.remove_app, ["DELETE"]),
            endpoints.route(app + "/models", self.link, ["POST"]),
            endpoints.route(app + "/models/{model}", self.unlink, ["DELETE"]),
        ]

    # -- models -----------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        return json_response({"models": self._dispatcher.describe()})

    async def add_model(self, request: Request) -> Response:
        body = decode_body(await request.body(), AddModel)
        name, runtime, path = _text(body.name, "name"), _text(body.runtime, "runtime"), body.path
        version = _version(body.version)
        settings, wait = body.settings, body.wait
        try:
            # Relative artifact paths are the server's: its working folder, like --model's.
            deployment = declared_deployment(name, runtime, path, version, settings, Path.cwd())
            spec = self._plugins.check_deployment(deployment)
        except (TypeError, ValueError) as exc:
            raise PredictionError(400, str(exc), model=name) from None
        spec = msgspec.structs.replace(spec, pool=spec.pool.with_floor(self._workers_per_model))
        queue: ModelQueue = await self._changes.submit(ModelAdded(spec=spec))
        if wait:
            try:
                await queue.wait_ready(spec.pool.cold_start_timeout_s)
            except PredictionError as exc:
                raise PredictionError(
                    503,
                    f"model {spec.label()!r} was added, but is not ready: {exc}",
                    model=spec.name,
                    version=spec.version,
                    state=status.state_of(queue),
                ) from None
        return json_response(
            {
                "model": self._describe(queue),
                "default_version": self._dispatcher.default_version(spec.name),
            },
            201,
        )

    async def _add_model(self, change: ModelAdded) -> ModelQueue:
        spec = change.spec
        async with self._model_locks[spec.name]:
            if self._dispatcher.has_model(spec.key):
                raise PredictionError(
                    409,
                    f"model {spec.label()!r} is already served: remove it first, or add "
                    "another version",
                    model=spec.name,
                    version=spec.version,
                )
            # A new version takes no traffic until it is rolled to.
            self._dispatcher.pin_default(spec.name)
            self._pools.manage(spec)
            self._report(events.model_added(spec, self._dispatcher.default_version(spec.name)))
            return self._dispatcher.queue_for(spec.name, spec.version)

    async def serve_again(self, specs: list[ModelSpec], default: str | None) -> None:
        """Serve the versions ``specs`` of one model again (a model loaded back), requests
        without a version going to ``default`` as before they were taken out."""
        name = specs[0].name
        async with self._model_locks[name]:
            for spec in specs:
                if self._dispatcher.has_model(spec.key):
                    continue
                self._dispatcher.pin_default(name)
                self._pools.manage(spec)
                self._report(events.model_added(spec, self._dispatcher.default_version(name)))
            if default is not None and self._dispatcher.has_model((name, default)):
                self._dispatcher.set_default(name, default)

    async def remove_model(self, request: Request) -> Response:
        name = request.path_params["name"]
        version = request.path_params.get("version")
        return json_response(
            await self._changes.submit(VersionsRemoved(name=name, version=version))
        )

    async def _remove_versions(self, change: VersionsRemoved) -> dict[str, Any]:
        return await self.remove_versions(change.name, change.version)

    async def remove_versions(
        self, name: str, version: str | None, going: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        """Remove one version of model ``name``, or all of them (``version`` None), once the
        requests already queued there finish; ``going``: versions removed with it."""
        async with self._model_locks[name]:
            self.check_removable(name, version, going)
            removed = self._dispatcher.versions(name) if version is None else [version]
            queues = [
                self._dispatcher.remove_model(
                    (name, v), f"model {name!r} version {v!r} was removed from this server"
                )
                for v in removed
            ]
            # Requests already queued finish (or time out) before the workers are let go.
            await asyncio.gather(*(q.wait_drained(self._request_timeout_s) for q in queues))
            unfinished = sum(queue.active_requests for queue in queues)
            for queue in queues:
                self._pools.release(queue, f"model {queue.spec.label()!r} was removed")
                self._report(events.model_removed(queue.spec))
        return {
            "removed": [f"{name}:{v}" for v in removed],
            "default": self._dispatcher.default_version(name),
            "unfinished_requests": unfinished,
        }

    def check_removable(
        self, name: str, version: str | None, going: frozenset[str] = frozenset()
    ) -> None:
        """A 404 for an unknown model or version, a 409 for a version that answers the
        requests without one while others remain (other than those ``going`` with it), or
        one linked to an application."""
        self._dispatcher.queue_for(name, version)
        default = self._dispatcher.default_version(name)
        staying = set(self._dispatcher.versions(name)) - going - {version}
        if version == default and staying:
            raise PredictionError(
                409,
                f"version {version} answers the requests to model {name!r} without a "
                "version: roll to another version first",
                model=name,
                version=version,
            )
        linked = self._apps.linking(name, version)
        if linked:
            what = f"version {version} of model" if version is not None else "model"
            raise PredictionError(
                409,
                f"{what} {name!r} is linked to applications {linked}: unlink it from them "
                "(or remove them) first",
                model=name,
                apps=linked,
            )

    async def set_pool(self, request: Request) -> Response:
        body = given(decode_body(await request.body(), PoolChange))
        if not body:
            raise PredictionError(
                400, f"give at least one of {sorted(PoolChange.__struct_fields__)}"
            )
        name, version = request.path_params["name"], request.path_params.get("version")
        queue = await self._changes.submit(PoolSet(name=name, version=version, fields=body))
        return json_response({"model": self._describe(queue)})

    async def _set_pool(self, change: PoolSet) -> ModelQueue:
        fields = dict(change.fields)
        async with self._model_locks[change.name]:
            queue = self._dispatcher.queue_for(change.name, change.version)
            current = queue.spec.pool
            minimum = fields.get("min_replicas")
            if "max_replicas" not in fields and isinstance(minimum, int):
                # Raising the floor above the ceiling raises the ceiling with it.
                fields["max_replicas"] = max(current.max_replicas, minimum)
            try:
                pool = msgspec.structs.replace(current, **fields)
            except (TypeError, ValueError) as exc:
                raise PredictionError(400, str(exc), **queue.labels()) from None
            queue.reconfigure(msgspec.structs.replace(queue.spec, pool=pool))
            self._report(events.pool_changed(queue.spec))
            return queue

    async def apply_plan(self, request: Request) -> Response:
        plan = decode_body(await request.body(), Plan)
        models = await self._changes.submit(PlanApplied(models=plan.models))
        return json_response({"models": models})

    async def _apply_plan(self, change: PlanApplied) -> list[ModelStatus]:
        """Every version of each model the plan sizes, served as it plans: checked whole
        first, so a plan that cannot apply to one model changes none."""
        for name in sorted(change.models):
            if not self._dispatcher.knows_model(name):
                raise PredictionError(
                    404, f"the plan sizes model {name!r}, which this server does not serve"
                )
        async with contextlib.AsyncExitStack() as locks:
            for name in sorted(change.models):  # in one order: no two plans wait on each other
                await locks.enter_async_context(self._model_locks[name])
            planned = []
            for name, model in sorted(change.models.items()):
                for version in self._dispatcher.versions(name):
                    queue = self._dispatcher.queue_for(name, version)
                    try:
                        planned.append((queue, planned_spec(queue.spec, model), model))
                    except ValueError as exc:
                        raise PredictionError(400, f"the plan: {exc}", **queue.labels()) from None
            for queue, spec, model in planned:
                # The workers running now are marked for renewal, and the tuner set, before
                # the queue tells the pool of its new settings: the pool then acts on all.
                renewing = spec.resources != queue.spec.resources and self._pools.renew(queue)
                self._pools.tune(spec.key, tuner_of(model))
                queue.reconfigure(spec)
                self._report(events.plan_applied(spec, renewing))
            return [self._describe(queue) for queue, _, _ in planned]

    async def roll(self, request: Request) -> Response:
        body = decode_body(await request.body(), Roll)
        name = request.path_params["name"]
        version = _version(body.version)
        queue = self._dispatcher.queue_for(name, version)
        # The version gets a ready worker before any request without a version goes to it
        # (its workers join every gateway, so it is ready wherever the roll then applies).
        await queue.wait_ready(body.timeout_s or queue.spec.pool.cold_start_timeout_s)
        previous = await self._changes.submit(Rolled(name=name, version=version))
        return json_response({"model": name, "default": version, "previous": previous})

    async def _roll(self, change: Rolled) -> str | None:
        name, version = change.name, change.version
        async with self._model_locks[name]:
            self._dispatcher.queue_for(name, version)  # a 404 if it went in the meantime
            previous = self._dispatcher.set_default(name, version)
            if previous != version:
                self._report(events.default_version_changed(name, version, previous))
            if self._on_roll is not None:
                self._on_roll(name, version)
            return previous

    def serves(self, key: tuple[str, str]) -> bool:
        return self._dispatcher.has_model(key)

    def _describe(self, queue: ModelQueue) -> ModelStatus:
        return status.describe(queue, self._dispatcher.default_version(queue.spec.name) or "")

    # -- applications -----------------------------------------------------------------------

    async def list_apps(self, request: Request) -> Response:
        return json_response({"apps": self._apps.describe()})

    async def add_app(self, request: Request) -> Response:
        body = given(decode_body(await request.body(), AddApp))
        if missing := [key for key in ("name", "models") if key not in body]:
            raise PredictionError(400, f"the request body needs {missing}", keys=sorted(body))
        if "default_output" in body:
            body.setdefault("has_default_output", True)
        added = await self._changes.submit(AppAdded(spec=_app_spec(body)))
        return json_response(added, 201)

    async def _add_app(self, change: AppAdded) -> dict[str, Any]:
        spec = change.spec
        async with self._apps_lock:
            if spec.name in self._apps:
                raise PredictionError(
                    409, f"application {spec.name!r} already exists", app=spec.name
                )
            try:
                application = self._apps.add(spec)
            except AppError as exc:
                raise PredictionError(400, str(exc), app=spec.name) from None
            self._report(events.app_started(spec.name, spec.policy, list(spec.models)))
            return {"app": application.describe()}

    async def add_pipeline(self, request: Request) -> Response:
        body = decode_body(await request.body(), AddPipeline)
        try:
            spec = PipelineSpec.from_dict(
                {"name": body.name, "steps": body.steps, "slo_ms": body.slo_ms}
            )
        except (TypeError, ValueError) as exc:
            raise PredictionError(400, str(exc), app=body.name) from None
        added = await self._changes.submit(PipelineAdded(spec=spec))
        return json_response(added, 201)

    async def _add_pipeline(self, change: PipelineAdded) -> dict[str, Any]:
        spec = change.spec
        async with self._apps_lock:
            if spec.name in self._apps:
                raise PredictionError(
                    409, f"an application or pipeline {spec.name!r} exists", app=spec.name
                )
            try:
                pipeline = self._apps.add_pipeline(spec)
            except AppError as exc:
                raise PredictionError(400, str(exc), app=spec.name) from None
            self._report(events.pipeline_started(spec.name, spec.models()))
            return {"pipeline": pipeline.describe()}

    async def remove_app(self, request: Request) -> Response:
        name = request.path_params["name"]
        return json_response(await self._changes.submit(AppRemoved(name=name)))

    async def _remove_app(self, change: AppRemoved) -> dict[str, Any]:
        async with self._apps_lock:
            self._apps.remove(change.name)
            self._report(events.app_removed(change.name))
        return {"removed": change.name}

    async def change_app(self, request: Request) -> Response:
        body = given(decode_body(await request.body(), AppChange))
        if not body:
            raise PredictionError(
                400, f"give at least one of {sorted(AppChange.__struct_fields__)}"
            )
        if "default_output" in body:
            body.setdefault("has_default_output", True)
        change = AppChanged(name=request.path_params["name"], fields=body)
        return json_response(await self._changes.submit(change))

    async def _change_app(self, change: AppChanged) -> dict[str, Any]:
        return await self._change(change.name, lambda current: change.fields)

    async def link(self, request: Request) -> Response:
        body = decode_body(await request.body(), Link)
        change = AppLinked(
            name=request.path_params["name"],
            model=_text(body.model, "model"),
            position=body.position,
        )
        return json_response(await self._changes.submit(change))

    async def _link(self, change: AppLinked) -> dict[str, Any]:
        reference, position = change.model, change.position

        def linked(current: AppSpec) -> Mapping[str, Any]:
            if position is not None and not 0 <= position <= len(current.models):
                raise PredictionError(
                    400,
                    f"'position' must be 0-{len(current.models)} for application "
                    f"{current.name!r}, got {position}",
                    app=current.name,
                )
            if reference in current.models:
                raise PredictionError(
                    409,
                    f"application {current.name!r} already lists {reference!r}",
                    app=current.name,
                )
            models = list(current.models)
            models.insert(len(models) if position is None else position, reference)
            return {"models": models}

        return await self._change(change.name, linked)

    async def unlink(self, request: Request) -> Response:
        change = AppUnlinked(name=request.path_params["name"], model=request.path_params["model"])
        return json_response(await self._changes.submit(change))

    async def _unlink(self, change: AppUnlinked) -> dict[str, Any]:
        reference = change.model

        def unlinked(current: AppSpec) -> Mapping[str, Any]:
            if reference not in current.models:
                raise PredictionError(
                    404,
                    f"application {current.name!r} does not list {reference!r}",
                    app=current.name,
                    models=list(current.models),
                )
            if len(current.models) == 1:
                raise PredictionError(
                    400,
                    f"{reference!r} is the only model of application {current.name!r}: an "
                    "application needs one; remove the application instead",
                    app=current.name,
                )
            return {"models": [m for m in current.models if m != reference]}

        return await self._change(change.name, unlinked)

    async def _change(
        self, name: str, changes: Callable[[AppSpec], Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Apply ``changes(current spec)`` to application ``name``; the policy keeps its state
        when it is the same policy and can take it."""
        async with self._apps_lock:
            current = self._apps.application(name).spec
            changed = dict(changes(current))
            if changed.get("policy", current.policy) != current.policy:
                # Params belong to a policy: a new policy starts from its own defaults.
                changed.setdefault("params", {})
            spec = _app_spec({**current.to_dict(), **changed, "name": name})
            try:
                application, afresh = self._apps.change(spec)
            except AppError as exc:
                raise PredictionError(400, str(exc), app=name) from None
            self._report(events.app_changed(name, spec.policy, list(spec.models), afresh))
        answer = {"app": application.describe(), "state": "kept" if afresh is None else "reset"}
        if afresh is not None:
            answer["reset_because"] = afresh
        return answer


def _text(value: str, key: str) -> str:
    if not value:
        raise PredictionError(400, f"'{key}' must be a non-empty string")
    return value


def _version(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        raise PredictionError(400, f"'version' must be a string, got {value!r}")
    return value


def _app_spec(data: Mapping[str, Any]) -> AppSpec:
    try:
        return AppSpec.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise PredictionError(400, str(exc)) from None
