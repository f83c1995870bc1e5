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
  Applications' answers and feedback, workers starting and exiting, pools scaling, and each
  batch and request done are told; a hook no plugin implements costs nothing.

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

    Runtimes are looked up in the gateway, which checks each deployment with its runtime
    (``ketch.deploy(runtime=...)``, ``ketch serve --model NAME=RUNTIME:PATH``, the management
    API), and again inside each worker, which loads the plugins its gateway loaded (the
    ``--plugin`` ones by the same reference, the installed ones from its own environment): a
    runtime's package must be installed wherever its workers run. Decorated functions are
    served by the built-in ``python`` runtime, the same way.

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


@hookspec
def ketch_worker_started(model: str, version: str, pid: int, host: str) -> None:
    """A worker joined the gateway, its model loaded and ready to serve. *Observer hook:
    every plugin's implementation runs.*

    Called once per worker, local or started by hand (``ketch worker``), when its READY
    reaches the gateway: the moment ``ketch: model NAME:VERSION ready: ...`` is printed. For
    example, count the replicas of each model::

        @ketch.hookimpl
        def ketch_worker_started(model, version, pid, host):
            REPLICAS[model, version] += 1

    :param model: the model's name.
    :param version: the model's version.
    :param pid: the worker's process id, on ``host``.
    :param host: the name of the machine the worker runs on.
    :return: nothing; an exception is logged and changes nothing.
    """


@hookspec
def ketch_worker_exited(model: str, version: str, pid: int, host: str, reason: str) -> None:
    """A worker left the gateway. *Observer hook: every plugin's implementation runs.*

    Called when a worker ``ketch_worker_started`` was told of leaves while the gateway runs:
    its pool scaled down, it crashed or was killed, it missed its heartbeats, or its model was
    removed (the moment ``ketch: model NAME:VERSION lost ...`` is printed). A batch it held is
    retried on another worker. The workers still serving when the gateway stops are not told:
    they stop with it. For example, alert on crashes::

        @ketch.hookimpl
        def ketch_worker_exited(model, version, pid, host, reason):
            if "scaled down" not in reason:
                alerts.send(f"{model}:{version} lost worker {pid}@{host}: {reason}")

    :param model: the model's name.
    :param version: the model's version.
    :param pid: the worker's process id, on ``host``.
    :param host: the name of the machine the worker ran on.
    :param reason: why it left, as the gateway prints it (``scaled down after 300 s with more
        workers than load``, ``worker pid 42 was killed by SIGKILL``, ...).
    :return: nothing; an exception is logged and changes nothing.
    """


@hookspec
def ketch_pool_scaled(model: str, version: str, change: str, details: Mapping[str, Any]) -> None:
    """A model version's pool of workers was scaled: it let its last worker go, or it was
    given new bounds. *Observer hook: every plugin's implementation runs.*

    Workers joining and leaving one by one are :func:`ketch_worker_started` and
    :func:`ketch_worker_exited`; this hook tells the changes of the pool as a whole. For
    example, log cold pools::

        @ketch.hookimpl
        def ketch_pool_scaled(model, version, change, details):
            if change == "scaled_to_zero":
                log.info("%s:%s is cold after %s s idle", model, version,
                         details["idle_timeout_s"])

    :param model: the model's name.
    :param version: the model's version.
    :param change: what happened, named as the ``event`` of ``ketch serve --log-format json``:
        ``"scaled_to_zero"`` (no request came for ``idle_timeout_s``, so the pool let its last
        worker go and the next request pays a cold start) or ``"pool_changed"`` (the
        management API set new replica bounds).
    :param details: the facts of the change, as in that JSON line: ``idle_timeout_s`` for
        ``"scaled_to_zero"``, ``min_replicas`` and ``max_replicas`` for ``"pool_changed"``.
    :return: nothing; an exception is logged and changes nothing.
    """


@hookspec
def ketch_batch_done(
    model: str, version: str, size: int, compute_s: float | None, pid: int
) -> None:
    """A worker gave back the outputs of a batch. *Observer hook: every plugin's
    implementation runs.*

    Called in the gateway for every batch a worker answered with outputs, before they reach
    the requests whose inputs made the batch (a batch the model raised on answers those
    requests with the error, and is told by :func:`ketch_request_done`). It runs on the hot
    path: keep it to counting. For example, a batch-size histogram::

        @ketch.hookimpl
        def ketch_batch_done(model, version, size, compute_s, pid):
            SIZES[model][size] += 1

    :param model: the model's name.
    :param version: the model's version.
    :param size: how many inputs the batch held.
    :param compute_s: the seconds the model spent on it, as its worker measured them; ``None``
        when the worker did not say.
    :param pid: the process id of the worker that computed it.
    :return: nothing; an exception is logged and changes nothing.
    """


@hookspec
def ketch_request_done(
    model: str, version: str, inputs: int, latency_s: float, status: int
) -> None:
    """A request to a model was answered, with outputs or an error. *Observer hook: every
    plugin's implementation runs.*

    Called in the gateway once per request the model version's queue took, just before its
    answer goes out: from ``/models/{name}/predict``, ``/v2/models/{name}/infer`` and the
    models an application asks. Requests refused before they are queued (429 for a full queue,
    503 for an unhealthy model) and those answered entirely from the prediction cache are not
    told. It runs on the hot path: keep it to counting. For example, an error rate::

        @ketch.hookimpl
        def ketch_request_done(model, version, inputs, latency_s, status):
            TOTAL[model] += 1
            if status >= 500:
                ERRORS[model] += 1

    :param model: the model's name.
    :param version: the model's version that answered.
    :param inputs: how many of the request's inputs the queue took (cache misses).
    :param latency_s: seconds from the request reaching the queue to its answer.
    :param status: the HTTP status of the answer: 200 with outputs, else the error's (400,
        500, 503, 504, ...); 499 when the client went away before its answer.
    :return: nothing; an exception is logged and changes nothing.
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
