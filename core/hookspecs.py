"""The hooks a ketch plugin can implement: the reference for plugin authors.

A plugin is a module (or object) with functions named after these hooks and decorated with
``@ketch.hookimpl``. Install it as a package with an entry point in the ``ketch`` group, or
load it with ``ketch serve --plugin MODULE_OR_FILE``. Built-in policies register through the
same hooks (see ``ketch.plugins``).

There are three kinds of hook:

- **registration** hooks get a ``register`` callback and call it once for each thing the
  plugin contributes; every plugin's implementation runs;
- **decision** hooks are answered by one plugin: the first implementation that returns
  something other than ``None`` wins, and ``None`` means "no opinion, ask the next one";
- **observer** hooks are told what happened and return nothing; every implementation runs.
  They run in the gateway's event loop, so they must be quick: hand slow work to a thread.

``ketch plugins --reference`` prints this reference as Markdown (``docs/plugins.md`` holds it).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import pluggy

from ketch.policy import Feedback, Policy, Query
from ketch.runtime import Runtime

#: The project name pluggy uses for markers, and the entry-point group plugins register under.
PROJECT = "ketch"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Marks a plugin's implementation of a hook: ``@ketch.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT)

#: ``register(name, policy_class)``: what ``ketch_register_policies`` receives
#: (``ketch.RegisterPolicy``).
RegisterPolicy: TypeAlias = Callable[[str, type[Policy]], None]
#: ``register(name, runtime_class)``: what ``ketch_register_runtimes`` receives
#: (``ketch.RegisterRuntime``).
RegisterRuntime: TypeAlias = Callable[[str, type[Runtime]], None]


@hookspec
def ketch_register_policies(register: RegisterPolicy) -> None:
    """Contribute selection policies. *Registration hook: every plugin's implementation runs.*

    :param register: call ``register(name, policy_class)`` once per policy. ``name`` is what
        an application's ``policy=`` names (letters, digits and ``_``); ``policy_class`` is a
        subclass of :class:`ketch.Policy`. Two plugins registering one name is an error that
        names both.
    :return: nothing.
    """


@hookspec
def ketch_register_runtimes(register: RegisterRuntime) -> None:
    """Contribute runtimes, the adapters that load saved models in workers.
    *Registration hook: every plugin's implementation runs.*

    Runtimes are looked up where a model is deployed (``ketch.deploy(runtime=...)``,
    ``ketch serve --model NAME=RUNTIME:PATH``) and again inside each worker, so a runtime's
    plugin must be installed wherever its workers run.

    :param register: call ``register(name, runtime_class)`` once per runtime. ``name`` is
        what ``runtime=`` names; ``runtime_class`` is a subclass of :class:`ketch.Runtime`,
        whose module must not import its framework at import time (only its constructor
        does, inside the worker). Two plugins registering one name is an error that names both.
    :return: nothing.
    """


@hookspec(firstresult=True)
def ketch_reward_of(app: str, model: str | None, prediction: Any, label: Any) -> float | None:
    """The reward in ``[0, 1]`` a model earns for ``prediction`` when the true answer is
    ``label``. *Decision hook: the first non-None answer wins.*

    Called for every model's prediction when feedback carries a ``label``, and for the
    application's output when the feedback has no ``reward`` of its own. The built-in
    answer (registered last, so any plugin's comes first) is ``1 - min(1, |prediction -
    label|)`` for numbers and ``1`` or ``0`` by equality for anything else.

    :param app: the application's name.
    :param model: the model that made the prediction; ``None`` for the application's own
        output (its combined answer, or its default output), which earns the answer's reward.
    :param prediction: what the model (or the application) answered.
    :param label: the true answer sent as feedback.
    :return: a number in ``[0, 1]``, or ``None`` to leave the decision to the next plugin.
    """


@hookspec
def ketch_query_answered(app: str, query: Query, answer: Mapping[str, Any]) -> None:
    """An application answered a query. *Observer hook: every plugin's implementation runs.*

    :param app: the application's name.
    :param query: the query, with its ``id`` and ``input``.
    :param answer: the JSON body sent to the client: ``output``, ``default``, ``models`` (whose
        predictions made the output), ``missing`` (models that did not answer, and why) and,
        for a default output, ``explanation``.
    :return: nothing; an exception is logged and does not change the answer.
    """


@hookspec
def ketch_feedback_observed(app: str, query: Query, feedback: Feedback) -> None:
    """An application's policy learnt from feedback. *Observer hook: every plugin's
    implementation runs.*

    :param app: the application's name.
    :param query: the query the feedback is about.
    :param feedback: the reward, label and per-model rewards the policy observed.
    :return: nothing; an exception is logged and does not change the answer.
    """


def hook_specs() -> dict[str, Callable[..., Any]]:
    """Every hook, by name, in the order of this module."""
    module = sys.modules[__name__]
    return {
        name: value
        for name, value in vars(module).items()
        if name.startswith("ketch_") and callable(value)
    }


def reference() -> str:
    """The hooks as Markdown, from their signatures and docstrings."""
    sections = []
    for name, function in hook_specs().items():
        signature = str(inspect.signature(function)).replace("'", "")
        doc = inspect.cleandoc(function.__doc__ or "")
        sections.append(f"### `{name}{signature}`\n\n{doc}\n")
    return "\n".join(sections)
