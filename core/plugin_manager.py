"""Build the plugin manager, and a typed face over its hooks.

:func:`load_plugins` is the one factory: the hookspecs, then the built-in plugins
(``ketch.plugins.BUILTIN_PLUGINS``, ``ketch.runtimes.BUILTIN_RUNTIMES``), then every entry
point in the ``ketch`` group (unless ``KETCH_DISABLE_PLUGIN_AUTOLOAD`` is set), then the
modules or files named with ``--plugin``, and last ``check_pending()``, so an implementation
of a hook that does not exist fails loudly. Nothing is built at import time.

A process builds one and passes it where it is needed: ``ketch serve`` builds it once for
discovery, deployments' checks, applications and observers. A worker process is another
process: it builds its own once at start, from what its plan carries (the ``--plugin``
references, as :attr:`Plugins.references`, and :attr:`Plugins.autoload`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

import pluggy

from ketch import hookspecs
from ketch.errors import KetchError
from ketch.hookspecs import PROJECT
from ketch.plugins import BUILTIN_PLUGINS
from ketch.policy import Feedback, Policy, Query
from ketch.runtime import Runtime
from ketch.runtimes import BUILTIN_RUNTIMES
from ketch.specs.deployments import Deployment
from ketch.specs.loader import import_source
from ketch.specs.models import ModelSpec

log = logging.getLogger("ketch.plugins")

#: Set (to anything but an empty string) to load no plugin from entry points.
DISABLE_AUTOLOAD_ENV = "KETCH_DISABLE_PLUGIN_AUTOLOAD"
#: The server events that tell ``ketch_pool_scaled`` (the kinds of
#: :mod:`ketch.observability.events`).
_POOL_EVENTS = ("scaled_to_zero", "pool_changed")
_REGISTERED_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
T = TypeVar("T")


class PluginError(KetchError):
    """A plugin could not be loaded, or registered something invalid."""


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One loaded plugin: its name, where it came from, and what it registered."""

    name: str
    source: str
    policies: tuple[str, ...]
    runtimes: tuple[str, ...]


class _Registry(Generic[T]):
    """The classes of one kind (policies, runtimes) the plugins registered, by name."""

    def __init__(self, kind: str, kinds: str, base: type[T]) -> None:
        self.kind = kind
        self.kinds = kinds
        self.base = base
        self.classes: dict[str, type[T]] = {}
        self.owners: dict[str, str] = {}

    def register_for(self, plugin: str) -> Callable[[str, type[T]], None]:
        """The ``register`` callback handed to ``plugin``'s registration hook."""

        def register(name: str, cls: type[T]) -> None:
            if not isinstance(name, str) or not _REGISTERED_NAME.match(name):
                raise PluginError(
                    f"plugin {plugin!r} registered a {self.kind} named {name!r}: use letters, "
                    "digits and '_', starting with a letter"
                )
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise PluginError(
                    f"plugin {plugin!r} registered {self.kind} {name!r} as {cls!r}, which is "
                    f"not a subclass of ketch.{self.base.__name__}"
                )
            other = self.owners.get(name)
            if other is not None:
                raise PluginError(
                    f"{self.kind} {name!r} is registered twice: by plugin {other!r} and by "
                    f"plugin {plugin!r}; uninstall one of them"
                )
            self.classes[name] = cls
            self.owners[name] = plugin

        return register

    def get(self, name: str) -> type[T]:
        try:
            return self.classes[name]
        except KeyError:
            installed = ", ".join(sorted(self.classes))
            raise PluginError(
                f"no {self.kind} named {name!r}; installed {self.kinds}: {installed}"
            ) from None

    def of_plugin(self, plugin: str) -> tuple[str, ...]:
        return tuple(name for name, owner in self.owners.items() if owner == plugin)


class Plugins:
    """The loaded plugins and typed calls of their hooks (use :func:`load_plugins`).

    :param references: the modules and files loaded besides the installed plugins (files as
        absolute paths).
    :param autoload: whether the installed plugins (entry points) were loaded. With
        ``references``, what another process passes to :func:`load_plugins` to load the same
        plugins.
    """

    def __init__(
        self,
        manager: pluggy.PluginManager,
        sources: Mapping[str, str],
        references: Sequence[str] = (),
        autoload: bool = True,
    ) -> None:
        self.manager = manager
        self._sources = dict(sources)
        self.references = tuple(references)
        self.autoload = autoload
        #: The hooks some plugin implements: an observer hook no plugin implements is not
        #: called at all, so the batches and requests it would be told of pay nothing.
        self._implemented = frozenset(
            name for name in hookspecs.hook_specs() if getattr(manager.hook, name).get_hookimpls()
        )
        self._policies = _Registry("policy", "policies", Policy)
        self._runtimes = _Registry("runtime", "runtimes", Runtime)
        for hook, registry in (
            (manager.hook.ketch_register_policies, self._policies),
            (manager.hook.ketch_register_runtimes, self._runtimes),
        ):
            # Called plugin by plugin, so that each registration knows whose it is.
            for impl in hook.get_hookimpls():
                impl.function(register=registry.register_for(impl.plugin_name))

    # -- lookups ----------------------------------------------------------------------------

    @property
    def policy_names(self) -> list[str]:
        return sorted(self._policies.classes)

    def policies(self) -> dict[str, type[Policy]]:
        """Every registered policy class by name, in the order they were registered."""
        return dict(self._policies.classes)

    def policy_class(self, name: str) -> type[Policy]:
        return self._policies.get(name)

    def plugin_of_policy(self, name: str) -> str:
        return self._policies.owners[name]

    def runtime_class(self, name: str) -> type[Runtime]:
        return self._runtimes.get(name)

    def check_deployment(self, deployment: Deployment) -> ModelSpec:
        """A deployment's spec, checked by its runtime (:meth:`Deployment.checked`);
        ``ValueError`` naming the model and what is wrong (an unknown runtime, a missing
        artifact, a misspelt option)."""
        try:
            runtime = self.runtime_class(deployment.runtime)
        except PluginError as exc:
            raise ValueError(f"model {deployment.name!r}: {exc}") from None
        return deployment.checked(runtime)

    def describe(self) -> list[PluginInfo]:
        """Every loaded plugin in load order, for ``ketch plugins``."""
        return [
            PluginInfo(
                name,
                self._sources.get(name, "registered"),
                self._policies.of_plugin(name),
                self._runtimes.of_plugin(name),
            )
            for name, plugin in self.manager.list_name_plugin()
            if plugin is not None
        ]

    # -- hook calls -------------------------------------------------------------------------

    def reward_of(self, app: str, model: str | None, prediction: Any, label: Any) -> float:
        """The ``ketch_reward_of`` answer, checked to be a number in [0, 1]."""
        reward = self.manager.hook.ketch_reward_of(
            app=app, model=model, prediction=prediction, label=label
        )
        if (
            isinstance(reward, bool)
            or not isinstance(reward, int | float)
            or not math.isfinite(reward)
            or not 0.0 <= reward <= 1.0
        ):
            raise PluginError(
                f"ketch_reward_of gave {reward!r} for {_whose(model)} of application {app!r}; "
                "a reward must be a number in [0, 1]"
            )
        return float(reward)

    def query_answered(self, app: str, query: Query, answer: Mapping[str, Any]) -> None:
        self._observe("ketch_query_answered", app=app, query=query, answer=answer)

    def feedback_observed(self, app: str, query: Query, feedback: Feedback) -> None:
        self._observe("ketch_feedback_observed", app=app, query=query, feedback=feedback)

    def state_changed(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Tell the observers of a server event, by the ``kind`` and ``fields`` of its
        :class:`ketch.observability.events.Event`: a worker ready (``ketch_worker_started``)
        or lost (``ketch_worker_exited``), a pool scaled (``ketch_pool_scaled``)."""
        if kind == "model_ready":
            self._observe(
                "ketch_worker_started",
                model=fields["model"],
                version=fields["version"],
                pid=fields["pid"],
                host=fields["host"],
            )
        elif kind == "worker_lost":
            self._observe(
                "ketch_worker_exited",
                model=fields["model"],
                version=fields["version"],
                pid=fields["pid"],
                host=fields["host"],
                reason=fields["reason"],
            )
        elif kind in _POOL_EVENTS:
            details = {k: v for k, v in fields.items() if k not in ("model", "version")}
            self._observe(
                "ketch_pool_scaled",
                model=fields["model"],
                version=fields["version"],
                change=kind,
                details=details,
            )

    def batch_done(
        self, model: str, version: str, size: int, compute_s: float | None, pid: int
    ) -> None:
        if "ketch_batch_done" in self._implemented:
            self._observe(
                "ketch_batch_done",
                model=model,
                version=version,
                size=size,
                compute_s=compute_s,
                pid=pid,
            )

    def request_done(
        self, model: str, version: str, inputs: int, latency_s: float, status: int
    ) -> None:
        if "ketch_request_done" in self._implemented:
            self._observe(
                "ketch_request_done",
                model=model,
                version=version,
                inputs=inputs,
                latency_s=latency_s,
                status=status,
            )

    def _observe(self, hook: str, **kwargs: Any) -> None:
        if hook not in self._implemented:
            return
        # Observers are told, not asked: one that fails is logged and ketch carries on.
        try:
            getattr(self.manager.hook, hook)(**kwargs)
        except Exception:
            log.exception("a plugin's %s raised; nothing else is affected", hook)


def load_plugins(extra: Sequence[str] = (), *, autoload: bool | None = None) -> Plugins:
    """The plugin manager with built-ins, entry points and ``extra`` modules or files.

    :param extra: modules (``pkg.policies``) or files (``my_policy.py``) to load as plugins,
        as ``ketch serve --plugin`` names them.
    :param autoload: whether to load the ``ketch`` entry-point group; ``None`` reads
        ``KETCH_DISABLE_PLUGIN_AUTOLOAD`` (:func:`autoload_wanted`).
    """
    if autoload is None:
        autoload = autoload_wanted()
    # Files as absolute paths: a worker given these references may run in another folder.
    references = list(dict.fromkeys(_absolute(reference) for reference in extra))
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    sources: dict[str, str] = {}
    for module_name in (*BUILTIN_PLUGINS, *BUILTIN_RUNTIMES):
        manager.register(importlib.import_module(module_name), module_name)
        sources[module_name] = "built in"
    if autoload:
        _load_entry_points(manager, sources)
    for reference in references:
        _register(manager, _import_plugin(reference), reference)
        sources[reference] = f"--plugin {reference}"
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"{exc}; the hooks a plugin can implement are in ketch.hookspecs"
        ) from None
    return Plugins(manager, sources, references, autoload)


def autoload_wanted() -> bool:
    """Whether installed plugins load: unless ``KETCH_DISABLE_PLUGIN_AUTOLOAD`` is set."""
    return not os.environ.get(DISABLE_AUTOLOAD_ENV)


def _absolute(reference: str) -> str:
    if reference.endswith(".py") or Path(reference).is_file():
        return str(Path(reference).resolve())
    return reference


def _load_entry_points(manager: pluggy.PluginManager, sources: dict[str, str]) -> None:
    for entry_point in _entry_points():
        if manager.get_plugin(entry_point.name) is not None:
            continue
        dist = entry_point.dist
        origin = f"{dist.name} {dist.version}" if dist is not None else entry_point.value
        try:
            plugin = entry_point.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {entry_point.name!r} ({entry_point.value}, from {origin}) failed to "
                f"load: {type(exc).__name__}: {exc}; uninstall it or set "
                f"{DISABLE_AUTOLOAD_ENV}=1"
            ) from exc
        _register(manager, plugin, entry_point.name)
        sources[entry_point.name] = f"entry point {entry_point.value} ({origin})"


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    # One entry point per name: a package installed twice on sys.path lists its points twice.
    seen: dict[str, importlib.metadata.EntryPoint] = {}
    for entry_point in importlib.metadata.entry_points(group=PROJECT):
        seen.setdefault(entry_point.name, entry_point)
    return seen.values()


def _import_plugin(reference: str) -> ModuleType:
    try:
        return import_source(reference)
    except Exception as exc:
        raise PluginError(
            f"plugin {reference!r} failed to load: {type(exc).__name__}: {exc}"
        ) from exc


def _register(manager: pluggy.PluginManager, plugin: object, name: str) -> None:
    try:
        manager.register(plugin, name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        raise PluginError(f"plugin {name!r} cannot be registered: {exc}") from exc


def _whose(model: str | None) -> str:
    return "the output" if model is None else f"model {model!r}"
