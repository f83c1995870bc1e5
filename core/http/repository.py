"""Triton's model repository extension: the index of the models a server knows, and explicit
load and unload, which ``ketch serve --model-control explicit`` allows (Triton's name for it;
the default, ``none``, refuses them, as Triton does outside explicit mode).

Unloading a model takes its versions out of service once their queued requests finish (as the
management API's removal does: refused while an application links it); the server remembers
them. Loading it brings them back, its default version as it was, with a configuration
override when one is given (``{"max_batch_size": 16}``: the serving and pool settings of
``@ketch.model``, checked as the decorator checks them). Loading a model that is served with
an override serves it anew under the new settings; without one it is already loaded. Loads
and unloads are changes of the management API (:mod:`ketch.http.admin_changes`): gateways that
share a Redis all make them.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ketch.http.admin import Admin
from ketch.http.admin_changes import Changes, ModelLoaded, ModelUnloaded
from ketch.http.endpoints import Endpoints, decode_body, json_response
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import PredictionError
from ketch.serving.status import ready_to_serve
from ketch.specs.models import ModelSpec, PoolSpec

ModelControl = Literal["none", "explicit"]
#: What a configuration override may set: the scalar settings of a model, and of its pool.
_SETTINGS = frozenset(
    {"max_batch_size", "max_delay_ms", "slo_ms", "max_queue", "cache_size", "stall_timeout_s"}
)
_POOL_SETTINGS = frozenset(PoolSpec.__struct_fields__)


class IndexEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    version: str
    state: str
    reason: str = ""


class IndexAnswer(msgspec.Struct, kw_only=True):
    """gRPC's ``RepositoryIndexResponse`` (REST answers the list itself, as Triton does)."""

    models: list[IndexEntry]


class LoadRequest(msgspec.Struct, kw_only=True):
    """``POST /v2/repository/models/{name}/load``; ``parameters.config`` is the override, as
    Triton's clients send it (a JSON text, or an object)."""

    parameters: dict[str, Any] = {}


class IndexRequest(msgspec.Struct, kw_only=True):
    ready: bool | UnsetType = UNSET


class Repository:
    """Index, load and unload over the management API's :class:`Admin`."""

    def __init__(
        self, dispatcher: Dispatcher, admin: Admin, changes: Changes, control: ModelControl
    ) -> None:
        self._dispatcher = dispatcher
        self._admin = admin
        self._changes = changes
        self._control = control
        changes.handle(ModelUnloaded, self._unload)
        changes.handle(ModelLoaded, self._load)
        #: The models taken out of service, by name: their versions and default version.
        self._unloaded: dict[str, tuple[list[ModelSpec], str | None]] = {}

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries = [
            IndexEntry(
                name=queue.spec.name,
                version=queue.spec.version,
                state="READY" if ready_to_serve(queue) else "UNAVAILABLE",
                reason="" if ready_to_serve(queue) else (queue.last_error or "not ready"),
            )
            for queue in self._dispatcher.queues()
        ]
        if not ready_only:
            entries += [
                IndexEntry(name=s.name, version=s.version, state="UNAVAILABLE", reason="unloaded")
                for specs, _ in self._unloaded.values()
                for s in specs
            ]
        return sorted(entries, key=lambda e: (e.name, e.version))

    def is_unloaded(self, name: str) -> bool:
        """Whether ``name`` is a model taken out of service by :meth:`unload`."""
        return name in self._unloaded and not self._dispatcher.knows_model(name)

    async def unload(self, name: str) -> None:
        self._allowed("unload")
        await self._changes.submit(ModelUnloaded(name=name))

    async def _unload(self, change: ModelUnloaded) -> None:
        name = change.name
        if name in self._unloaded and not self._dispatcher.knows_model(name):
            return  # unloaded already
        versions = self._dispatcher.versions(name)
        self._dispatcher.queue_for(name, None)  # the 404 of an unknown model
        specs = [self._dispatcher.queue_for(name, v).spec for v in versions]
        default = self._dispatcher.default_version(name)
        await self._admin.remove_versions(name, None, frozenset(versions))
        self._unloaded[name] = (specs, default)

    async def load(self, name: str, parameters: dict[str, Any]) -> None:
        """Load ``name`` back (see the module's docstring), its load request's ``parameters``
        holding the config override; errors read ``failed to load``, as Triton's do (its
        clients look for the words)."""
        self._allowed("load")
        try:
            if files := model_files(parameters):
                # Triton answers a load whose files it cannot take INTERNAL (500), and its
                # clients check for that status: ketch answers as Triton does.
                raise PredictionError(
                    500,
                    f"failed to poll from model repository: ketch takes no model files with "
                    f"a load (got {files[:3]}); push code and artifacts with ketch deploy",
                )
            override = config_override(parameters)
            await self._changes.submit(ModelLoaded(name=name, override=override))
        except PredictionError as exc:
            error = exc.body["error"]
            raise PredictionError(
                exc.status, f"failed to load {name!r}: {error}", model=name
            ) from None

    async def _load(self, change: ModelLoaded) -> None:
        name, override = change.name, change.override
        if name in self._unloaded:
            specs, default = self._unloaded[name]
        elif self._dispatcher.knows_model(name):
            if not override:
                return  # loaded already, as it is
            versions = self._dispatcher.versions(name)
            specs = [self._dispatcher.queue_for(name, v).spec for v in versions]
            default = self._dispatcher.default_version(name)
        else:
            raise PredictionError(
                404, f"Request for unknown model: {name!r} is not found", model=name
            )
        changed = [_overridden(spec, override) for spec in specs] if override else specs
        if self._dispatcher.knows_model(name):
            await self._admin.remove_versions(name, None, frozenset(s.version for s in specs))
        await self._admin.serve_again(changed, default)
        self._unloaded.pop(name, None)

    def _allowed(self, what: str) -> None:
        if self._control != "explicit":
            raise PredictionError(
                400,
                f"explicit model {what} is not allowed: start ketch serve with "
                "--model-control explicit to load and unload models",
            )

    # -- REST -------------------------------------------------------------------------------

    def routes(self, endpoints: Endpoints) -> list[Route]:
        model = "/v2/repository/models/{name}"
        return [
            endpoints.route("/v2/repository/index", self.index_route, ["POST"]),
            endpoints.route(model + "/load", self.load_route, ["POST"]),
            endpoints.route(model + "/unload", self.unload_route, ["POST"]),
        ]

    async def index_route(self, request: Request) -> Response:
        raw = await request.body()
        body = decode_body(raw, IndexRequest) if raw.strip() else IndexRequest()
        return json_response(self.index(body.ready is True))

    async def load_route(self, request: Request) -> Response:
        raw = await request.body()
        body = decode_body(raw, LoadRequest) if raw.strip() else LoadRequest()
        await self.load(request.path_params["name"], body.parameters)
        return json_response({})

    async def unload_route(self, request: Request) -> Response:
        await self.unload(request.path_params["name"])
        return json_response({})


def model_files(parameters: dict[str, Any]) -> list[str]:
    """The ``file:...`` parameters of a load: model files pushed with it (Triton's way)."""
    return [key for key in parameters if key.startswith("file:")]


def config_override(parameters: dict[str, Any]) -> dict[str, Any] | None:
    """The ``config`` parameter of a load: a JSON object (or its text), or None."""
    config = parameters.get("config")
    if config is None:
        return None
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError as exc:
            raise PredictionError(400, f"'config' is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise PredictionError(400, f"'config' must be a JSON object, got {config!r}")
    return config


def _numbers(override: dict[str, Any]) -> dict[str, Any]:
    """Numbers given as text (``{"max_batch_size": "16"}``: protobuf's JSON writes 64-bit
    integers so, and Triton's clients send them so) as numbers."""
    values = {}
    for key, value in override.items():
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    pass
        values[key] = value
    return values


def _overridden(spec: ModelSpec, override: dict[str, Any]) -> ModelSpec:
    override = _numbers(override)
    if unknown := sorted(set(override) - _SETTINGS - _POOL_SETTINGS):
        raise PredictionError(
            400,
            f"the config override sets {unknown}, which ketch cannot change; it takes "
            f"{sorted(_SETTINGS | _POOL_SETTINGS)}",
            model=spec.name,
        )
    settings = spec.to_dict()
    pool = {**settings["pool"], **{k: v for k, v in override.items() if k in _POOL_SETTINGS}}
    changed = {**settings, **{k: v for k, v in override.items() if k in _SETTINGS}, "pool": pool}
    try:
        return ModelSpec.from_dict(changed)
    except (TypeError, ValueError, msgspec.ValidationError) as exc:
        raise PredictionError(400, f"the config override: {exc}", model=spec.name) from None
