"""The management API's changes as data, so that every gateway applies the same ones in the
same order.

A route of the management API (and a load or unload of Triton's repository routes) checks its
request, turns it into a :data:`Change`, and hands it to :meth:`Changes.submit`. One gateway
alone applies it at once. Gateways that share a Redis (``--state``) append it to one log
that each of them reads and applies in order (:mod:`ketch.http.shared_changes`): the gateway
that took the request answers with what applying it there gave, and the others apply it too,
so they all serve the same models and applications after any change, wherever it was made.

Applying a change never waits for a worker (a roll waits for its version's worker before it
is submitted; an added model is waited for after): the log moves at the pace of the changes,
not of cold starts. A change is what it asks for, not what came of it, so that its outcome
follows the state it meets (a link to an application another gateway removed just before is a
404 everywhere).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import msgspec

from ketch.planning.applied import PlannedModel
from ketch.specs.apps import AppSpec
from ketch.specs.models import ModelSpec
from ketch.specs.pipelines import PipelineSpec


class _Change(msgspec.Struct, kw_only=True, tag_field="change"):
    """One change, tagged with its kind in the log."""


class ModelAdded(_Change, tag="model_added"):
    """A model version added; ``spec`` as the gateway that took the request resolved it (its
    paths absolute, its runtime checked there)."""

    spec: ModelSpec


class VersionsRemoved(_Change, tag="versions_removed"):
    """One version of a model removed (all of them: ``version`` None) once its queued
    requests finish."""

    name: str
    version: str | None


class PoolSet(_Change, tag="pool_set"):
    """A pool's bounds or timings changed: the fields given, applied to its pool as it is."""

    name: str
    version: str | None
    fields: dict[str, Any]


class PlanApplied(_Change, tag="plan_applied"):
    """A plan ``ketch plan`` wrote, applied to every version of the models it sizes."""

    models: dict[str, PlannedModel]


class Rolled(_Change, tag="rolled"):
    """Requests without a version go to ``version`` from now on."""

    name: str
    version: str


class AppAdded(_Change, tag="app_added"):
    spec: AppSpec


class PipelineAdded(_Change, tag="pipeline_added"):
    spec: PipelineSpec


class AppRemoved(_Change, tag="app_removed"):
    name: str


class AppChanged(_Change, tag="app_changed"):
    """Some of an application's fields changed (the others keep their values)."""

    name: str
    fields: dict[str, Any]


class AppLinked(_Change, tag="app_linked"):
    name: str
    model: str
    position: int | None


class AppUnlinked(_Change, tag="app_unlinked"):
    name: str
    model: str


class ModelUnloaded(_Change, tag="model_unloaded"):
    """Triton's repository unload: every version of a model taken out of service."""

    name: str


class ModelLoaded(_Change, tag="model_loaded"):
    """Triton's repository load: a model back in service, its config overridden if given."""

    name: str
    override: dict[str, Any] | None


Change = (
    ModelAdded
    | VersionsRemoved
    | PoolSet
    | PlanApplied
    | Rolled
    | AppAdded
    | PipelineAdded
    | AppRemoved
    | AppChanged
    | AppLinked
    | AppUnlinked
    | ModelUnloaded
    | ModelLoaded
)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Change)


def encode_change(change: Change) -> bytes:
    return _encoder.encode(change)


def decode_change(data: bytes) -> Change:
    """Raises :class:`msgspec.ValidationError` (or DecodeError) for what is not a change."""
    return _decoder.decode(data)


class ChangeLog(Protocol):
    """Where changes go when several gateways must all apply them (:mod:`.shared_changes`)."""

    async def submit(self, change: Change) -> Any:
        """Append ``change``; return what applying it here gave, once this gateway has
        reached it in the log (raising what applying it raised)."""


C = TypeVar("C", bound=_Change)


class Changes:
    """Applies each kind of change with the handler its part of the server registered."""

    def __init__(self) -> None:
        self._handlers: dict[type[Any], Callable[[Any], Awaitable[Any]]] = {}
        self._log: ChangeLog | None = None

    def handle(self, kind: type[C], handler: Callable[[C], Awaitable[Any]]) -> None:
        self._handlers[kind] = handler

    def share_through(self, log: ChangeLog) -> None:
        """From now on every change goes through ``log``, which calls :meth:`apply`."""
        self._log = log

    async def submit(self, change: Change) -> Any:
        """Make ``change`` (on every gateway, when they share a log): what it gave here."""
        if self._log is None:
            return await self.apply(change)
        return await self._log.submit(change)

    async def apply(self, change: Change) -> Any:
        return await self._handlers[type(change)](change)
