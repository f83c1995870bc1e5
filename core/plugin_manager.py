"""Build the plugin manager, and a typed face over its hooks.

:func:`load_plugins` is the one factory: the hookspecs, then the built-in plugins
(``ketch.plugins.BUILTIN_PLUGINS``), then every entry point in the ``ketch`` group (unless
``KETCH_DISABLE_PLUGIN_AUTOLOAD`` is set), then the modules or files named with ``--plugin``,
and last ``check_pending()``, so an implementation of a hook that does not exist fails loudly.
Nothing is built at import time.
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
from types import ModuleType
from typing import Any

import pluggy

from ketch import hookspecs
from ketch.errors import KetchError
from ketch.hookspecs import PROJECT
from ketch.loader import import_source
from ketch.plugins import BUILTIN_PLUGINS
from ketch.policy import Feedback, Policy, Query

log = logging.getLogger("ketch.plugins")

#: Set (to anything but an empty string) to load no plugin from entry points.
DISABLE_AUTOLOAD_ENV = "KETCH_DISABLE_PLUGIN_AUTOLOAD"
_POLICY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


class PluginError(KetchError):
    """A plugin could not be loaded, or registered something invalid."""


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One loaded plugin: its name, where it came from, and the policies it registered."""

    name: str
    source: str
    policies: tuple[str, ...]


class Plugins:
    """The loaded plugins and typed calls of their hooks (use :func:`load_plugins`)."""

    def __init__(self, manager: pluggy.PluginManager, sources: Mapping[str, str]) -> None:
        self.manager = manager
        self._sources = dict(sources)
        self._policies: dict[str, type[Policy]] = {}
        self._policy_plugin: dict[str, str] = {}
        self._collect_policies()

    # -- registration -----------------------------------------------------------------------

    def _collect_policies(self) -> None:
        for impl in self.manager.hook.ketch_register_policies.get_hookimpls():
            impl.function(register=self._policy_register(impl.plugin_name))

    def _policy_register(self, plugin: str) -> Callable[[str, type[Policy]], None]:
        def register(name: str, policy_class: type[Policy]) -> None:
            if not isinstance(name, str) or not _POLICY_NAME.match(name):
                raise PluginError(
                    f"plugin {plugin!r} registered a policy named {name!r}: use letters, "
                    "digits and '_', starting with a letter"
                )
            if not (isinstance(policy_class, type) and issubclass(policy_class, Policy)):
                raise PluginError(
                    f"plugin {plugin!r} registered policy {name!r} as {policy_class!r}, "
                    "which is not a subclass of ketch.Policy"
                )
            other = self._policy_plugin.get(name)
            if other is not None:
                raise PluginError(
                    f"policy {name!r} is registered twice: by plugin {other!r} and by plugin "
                    f"{plugin!r}; uninstall one of them"
                )
            self._policies[name] = policy_class
            self._policy_plugin[name] = plugin

        return register

    # -- lookups ----------------------------------------------------------------------------

    @property
    def policy_names(self) -> list[str]:
        return sorted(self._policies)

    def policy_class(self, name: str) -> type[Policy]:
        try:
            return self._policies[name]
        except KeyError:
            raise PluginError(
                f"no policy named {name!r}; installed policies: {', '.join(self.policy_names)}"
            ) from None

    def plugin_of_policy(self, name: str) -> str:
        return self._policy_plugin[name]

    def describe(self) -> list[PluginInfo]:
        """Every loaded plugin in load order, for ``ketch plugins``."""
        infos = []
        for name, plugin in self.manager.list_name_plugin():
            if plugin is None:
                continue
            policies = tuple(p for p, owner in self._policy_plugin.items() if owner == name)
            infos.append(PluginInfo(name, self._sources.get(name, "registered"), policies))
        return infos

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

    def _observe(self, hook: str, **kwargs: Any) -> None:
        # Observers are told, not asked: one that fails is logged and the request goes on.
        try:
            getattr(self.manager.hook, hook)(**kwargs)
        except Exception:
            log.exception("a plugin's %s raised; the request is not affected", hook)


def load_plugins(extra: Sequence[str] = (), *, autoload: bool | None = None) -> Plugins:
    """The plugin manager with built-ins, entry points and ``extra`` modules or files.

    :param extra: modules (``pkg.policies``) or files (``my_policy.py``) to load as plugins,
        as ``ketch serve --plugin`` names them.
    :param autoload: whether to load the ``ketch`` entry-point group; ``None`` reads
        ``KETCH_DISABLE_PLUGIN_AUTOLOAD``.
    """
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    sources: dict[str, str] = {}
    for module_name in BUILTIN_PLUGINS:
        manager.register(importlib.import_module(module_name), module_name)
        sources[module_name] = "built in"
    if autoload:
        _load_entry_points(manager, sources)
    for reference in extra:
        _register(manager, _import_plugin(reference), reference)
        sources[reference] = f"--plugin {reference}"
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"{exc}; the hooks a plugin can implement are in ketch.hookspecs"
        ) from None
    return Plugins(manager, sources)


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
