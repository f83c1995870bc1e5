"""Applications at run time: ask the models a policy selects, combine what answers in time.

One :class:`Application` per declared application, in the gateway. A query goes:

1. ``policy.select`` names the models to ask, ``policy.mirror`` the ones that only shadow;
2. each is asked through its model queue (cache, batching, workers), with the application's
   deadline as the request's deadline, so a model that cannot answer in time is never
   computed once it is late;
3. when every asked model answered, ``policy.escalate`` may ask more (a cascade);
4. at the deadline, or when nothing is left to ask, ``policy.combine`` gets the predictions
   that arrived (straggler mitigation); with none, the ``default_output`` is answered.

Each answer is remembered with every prediction that reached the gateway, late ones included,
so that feedback can reward each model: the latest ones, within the application's count and
byte bounds (``query_memory``, :mod:`ketch.applications.memory`). A policy's code runs in the
gateway: whatever it raises or returns that does not make sense becomes a 500 that names the
policy and its plugin, and the gateway carries on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from ketch.applications.memory import QUERY_OVERHEAD_BYTES, QueryMemory, encoded_size
from ketch.applications.saving import StateSaver
from ketch.applications.state import StateStore
from ketch.errors import AppError
from ketch.observability.metrics import AppSample
from ketch.plugin_manager import PluginError, Plugins
from ketch.policy import Combined, Feedback, Policy, Query
from ketch.serving.admission import Deadlines, predict
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import Deadline, PredictionError
from ketch.specs.apps import AppSpec

log = logging.getLogger("ketch.apps")


@dataclass(slots=True)
class _Record:
    """A query after its answer: what feedback needs to reward each model."""

    query: Query
    #: Every model's prediction that reached the gateway, in time or late, mirrored or not.
    predictions: dict[str, Any] = field(default_factory=dict)
    used: list[str] = field(default_factory=list)
    output: Any = None
    default: bool = False
    has_feedback: bool = False
    #: Whether it is in the application's memory: a prediction arriving later adds its size.
    kept: bool = False


class Application:
    """One application: its policy, its models' queues, and its remembered queries."""

    def __init__(
        self,
        spec: AppSpec,
        policy: Policy,
        plugins: Plugins,
        dispatcher: Dispatcher,
        deadlines: Deadlines,
    ) -> None:
        self.spec = spec
        self.policy = policy
        self._plugins = plugins
        self._dispatcher = dispatcher
        self._deadlines = deadlines
        self._plugin = plugins.plugin_of_policy(spec.policy)
        self._memory: QueryMemory[_Record] = QueryMemory(*spec.query_bounds())
        self._background: set[asyncio.Future[Any]] = set()
        self.dirty = False
        self.counts = {"queries": 0, "defaults": 0, "errors": 0, "feedback": 0}

    # -- predict ----------------------------------------------------------------------------

    async def predict(self, value: Any, timeout_ms: float | None) -> dict[str, Any]:
        """The answer to one query, as the JSON body; raises :class:`PredictionError`."""
        self.counts["queries"] += 1
        try:
            return await self._predict(value, timeout_ms)
        except PredictionError:
            self.counts["errors"] += 1
            raise

    async def _predict(self, value: Any, timeout_ms: float | None) -> dict[str, Any]:
        query = Query(uuid.uuid4().hex, self.spec.name, value)
        deadline = self._deadlines.deadline(timeout_ms, self.spec.slo_ms)
        budget_s = deadline.budget_s
        record = _Record(query)
        failures: dict[str, PredictionError] = {}
        selected = self._models_from("select", self.policy.select, query, required=True)
        mirrored = [
            m for m in self._models_from("mirror", self.policy.mirror, query) if m not in selected
        ]
        asked: dict[str, asyncio.Future[Any]] = {}
        self._ask(selected, asked, record, failures, deadline)
        mirror_tasks: dict[str, asyncio.Future[Any]] = {}
        mirror_deadline = self._deadlines.deadline(None, None)
        self._ask(mirrored, mirror_tasks, record, failures, mirror_deadline)
        while True:
            remaining = deadline.at - time.monotonic()
            pending = [task for task in asked.values() if not task.done()]
            if pending and remaining > 0:
                await asyncio.wait(pending, timeout=remaining)
            if any(not task.done() for task in asked.values()) or time.monotonic() >= deadline.at:
                break
            arrived = {m: record.predictions[m] for m in asked if m in record.predictions}
            more = [
                m
                for m in self._models_from("escalate", self.policy.escalate, query, arrived)
                if m not in asked
            ]
            if not more:
                break
            self._ask(more, asked, record, failures, deadline)
        # Snapshot now: a straggler that arrives later is kept for feedback, not combined.
        in_time = {
            m: record.predictions[m]
            for m in self.spec.models
            if m in asked and m in record.predictions
        }
        missing = {m: _why_missing(failures.get(m), budget_s) for m in asked if m not in in_time}
        if mirror_tasks:
            self._compare_later(query, in_time, mirror_tasks, record)
        if in_time:
            answer = self._combined(query, in_time, missing, record)
        else:
            answer = self._default(query, missing, failures, budget_s, record)
        self._remember(record)
        self._plugins.query_answered(self.spec.name, query, answer)
        return answer

    def _ask(
        self,
        models: Sequence[str],
        tasks: dict[str, asyncio.Future[Any]],
        record: _Record,
        failures: dict[str, PredictionError],
        deadline: Deadline,
    ) -> None:
        for reference in models:
            task = asyncio.ensure_future(self._ask_model(reference, record.query.input, deadline))
            task.add_done_callback(_arrival(reference, record, failures, self._memory))
            tasks[reference] = task

    async def _ask_model(self, reference: str, value: Any, deadline: Deadline) -> Any:
        name, _, version = reference.partition(":")
        queue = self._dispatcher.queue_for(name, version or None)
        outputs = await predict(queue, [value], deadline)
        return _plain(outputs[0])

    def _combined(
        self, query: Query, in_time: dict[str, Any], missing: dict[str, str], record: _Record
    ) -> dict[str, Any]:
        result = self._call("combine", self.policy.combine, query, in_time)
        combined = result if isinstance(result, Combined) else Combined(result)
        confidence = combined.confidence
        if confidence is not None and (
            isinstance(confidence, bool)
            or not isinstance(confidence, int | float)
            or not math.isfinite(confidence)
        ):
            raise self._policy_error("combine", f"gave a confidence of {confidence!r}")
        output = _plain(combined.output)
        try:
            orjson.dumps(output, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError as exc:
            raise self._policy_error(
                "combine", f"gave an output that is not JSON ({exc})"
            ) from None
        record.output, record.used = output, list(in_time)
        return {
            "output": output,
            "query_id": query.id,
            "app": self.spec.name,
            "default": False,
            "models": list(in_time),
            "confidence": confidence,
            "missing": missing,
        }

    def _default(
        self,
        query: Query,
        missing: dict[str, str],
        failures: dict[str, PredictionError],
        budget_s: float,
        record: _Record,
    ) -> dict[str, Any]:
        reasons = "; ".join(f"{m}: {why}" for m, why in missing.items())
        explanation = f"no model answered within {budget_s * 1000:g} ms ({reasons})"
        if not self.spec.has_default_output:
            statuses = {failures[m].status if m in failures else 504 for m in missing}
            raise PredictionError(
                statuses.pop() if len(statuses) == 1 else 503,
                f"application {self.spec.name!r}: {explanation}, and it has no default_output",
                app=self.spec.name,
                missing=missing,
            )
        self.counts["defaults"] += 1
        record.output, record.default = self.spec.default_output, True
        return {
            "output": self.spec.default_output,
            "query_id": query.id,
            "app": self.spec.name,
            "default": True,
            "models": [],
            "confidence": None,
            "missing": missing,
            "explanation": explanation,
        }

    def _compare_later(
        self,
        query: Query,
        served: dict[str, Any],
        mirror_tasks: dict[str, asyncio.Future[Any]],
        record: _Record,
    ) -> None:
        async def compare() -> None:
            await asyncio.wait(list(mirror_tasks.values()))
            mirrored = {m: record.predictions[m] for m in mirror_tasks if m in record.predictions}
            try:
                self._call("compare", self.policy.compare, query, served, mirrored)
            except PredictionError as exc:
                log.error("%s", exc)
            self.dirty = True

        task = asyncio.ensure_future(compare())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _remember(self, record: _Record) -> None:
        record.kept = True
        self._memory.remember(record.query.id, record, _size_of(record))

    # -- feedback ---------------------------------------------------------------------------

    def feedback(
        self, query_id: str, reward: float | None, label: Any, has_label: bool
    ) -> dict[str, Any]:
        """Teach the policy about one answered query; raises :class:`PredictionError`."""
        record = self._memory.get(query_id)
        if record is None:
            # Never answered, or forgotten past the bounds: the client cannot tell which, and
            # the answer is the same.
            memory = self._memory
            raise PredictionError(
                404,
                f"application {self.spec.name!r} has no query {query_id!r}: feedback must "
                f"name a query_id it answered, and it keeps only its latest queries (at most "
                f"{memory.max_queries} and {memory.max_bytes} bytes of them, set by its "
                f"query_memory {self.spec.query_memory!r})",
                app=self.spec.name,
            )
        if record.has_feedback:
            raise PredictionError(
                409, f"query {query_id!r} already had its feedback", app=self.spec.name
            )
        # A model unlinked since the query was answered is no longer the policy's to reward.
        predictions = {m: p for m, p in record.predictions.items() if m in self.spec.models}
        try:
            if has_label:
                rewards = {
                    m: self._plugins.reward_of(self.spec.name, m, p, label)
                    for m, p in predictions.items()
                }
                if reward is None:
                    reward = self._plugins.reward_of(self.spec.name, None, record.output, label)
            else:
                assert reward is not None
                rewards = {m: reward for m in record.used if m in self.spec.models}
        except PluginError as exc:
            raise PredictionError(500, str(exc), app=self.spec.name) from None
        feedback = Feedback(
            reward, label if has_label else None, record.output, predictions, rewards
        )
        self._call("observe", self.policy.observe, record.query, feedback)
        record.has_feedback = True
        self.dirty = True
        self.counts["feedback"] += 1
        self._plugins.feedback_observed(self.spec.name, record.query, feedback)
        return {"query_id": query_id, "app": self.spec.name, "reward": reward, "rewards": rewards}

    # -- the policy's calls -----------------------------------------------------------------

    def _call(self, step: str, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except Exception as exc:
            log.exception(
                "policy %r of application %r failed in %s()", self.spec.policy, self.spec.name, step
            )
            raise self._policy_error(step, f"raised {type(exc).__name__}: {exc}") from None

    def _models_from(
        self, step: str, method: Callable[..., Any], *args: Any, required: bool = False
    ) -> list[str]:
        chosen = self._call(step, method, *args)
        if isinstance(chosen, str) or not isinstance(chosen, Sequence):
            raise self._policy_error(step, f"returned {chosen!r}, not a list of model names")
        unknown = [m for m in chosen if m not in self.spec.models]
        if unknown:
            raise self._policy_error(
                step,
                f"returned {unknown!r}, not among the application's models "
                f"{list(self.spec.models)!r}",
            )
        if required and not chosen:
            raise self._policy_error(step, "chose no model")
        return list(dict.fromkeys(chosen))

    def _policy_error(self, step: str, what: str) -> PredictionError:
        return PredictionError(
            500,
            f"policy {self.spec.policy!r} (plugin {self._plugin!r}) of application "
            f"{self.spec.name!r} {what} in {step}()",
            app=self.spec.name,
            policy=self.spec.policy,
            plugin=self._plugin,
        )

    def successor(self, spec: AppSpec, policy: Policy) -> Application:
        """This application with a new spec and policy (an operator changed it): it keeps
        the queries answered so far, for their feedback, and the counts. Queries in flight
        finish with this one."""
        after = Application(spec, policy, self._plugins, self._dispatcher, self._deadlines)
        after._memory = self._memory
        after._memory.bound(*spec.query_bounds())
        after._background = self._background
        after.counts = self.counts
        after.dirty = True
        return after

    def describe(self) -> dict[str, Any]:
        try:
            state: Any = self.policy.state_dict()
        except Exception as exc:
            state = {"error": f"state_dict() raised {type(exc).__name__}: {exc}"}
        return {
            **self.spec.to_dict(),
            "plugin": self._plugin,
            **self.counts,
            "queries_held": len(self._memory),
            "query_bytes_held": self._memory.held_bytes,
            "policy_state": state,
        }


def _arrival(
    reference: str,
    record: _Record,
    failures: dict[str, PredictionError],
    memory: QueryMemory[_Record],
) -> Callable[[asyncio.Future[Any]], None]:
    """Done-callback of a model's task: keep its prediction, or why it has none."""

    def arrived(task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            prediction = record.predictions[reference] = task.result()
            if record.kept:  # a straggler or a mirror, after the answer
                memory.grow(record.query.id, encoded_size(prediction))
        elif isinstance(error, PredictionError):
            failures[reference] = error
        else:
            failures[reference] = PredictionError(500, f"{type(error).__name__}: {error}")

    return arrived


def _size_of(record: _Record) -> int:
    """What keeping ``record`` costs, as :mod:`ketch.applications.memory` counts it."""
    size = QUERY_OVERHEAD_BYTES + encoded_size(record.query.input)
    size += encoded_size(record.query.notes)
    predictions = list(record.predictions.values())
    size += sum(encoded_size(prediction) for prediction in predictions)
    # The output is often one of the predictions, or the shared default_output: no new bytes.
    if not record.default and not any(record.output is p for p in predictions):
        size += encoded_size(record.output)
    return size


def _why_missing(error: PredictionError | None, budget_s: float) -> str:
    if error is None or error.status == 504:
        return f"no answer within {budget_s * 1000:g} ms"
    return f"{error.status}: {error.body['error']}"


def _plain(value: Any) -> Any:
    """Numpy values as the JSON-like values policies expect (lists and Python numbers)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class Applications:
    """Every application of the gateway: building them from their specs (the served file's,
    or the management API's), and saving their policies' state."""

    def __init__(
        self,
        store: StateStore,
        plugins: Plugins,
        dispatcher: Dispatcher,
        deadlines: Deadlines,
    ) -> None:
        self._apps: dict[str, Application] = {}
        self._store = store
        self._plugins = plugins
        self._dispatcher = dispatcher
        self._deadlines = deadlines
        self._saver = StateSaver(store, self._apps.values)

    def build(self, spec: AppSpec) -> Application:
        """An application for ``spec`` with a fresh policy; raises :class:`AppError` naming
        the application and what is wrong (a model it lists is not served, an unknown
        policy, params or models the policy rejects)."""
        for reference in spec.models:
            name, _, version = reference.partition(":")
            try:
                self._dispatcher.queue_for(name, version or None)
            except PredictionError as exc:
                raise AppError(f"application {spec.name!r} lists {reference!r}: {exc}") from None
        try:
            policy_class = self._plugins.policy_class(spec.policy)
        except PluginError as exc:
            raise AppError(f"application {spec.name!r}: {exc}") from None
        try:
            policy = policy_class(spec.models, **spec.params)
        except (TypeError, ValueError) as exc:
            raise AppError(
                f"application {spec.name!r}: policy {spec.policy!r} rejects its models "
                f"{list(spec.models)} or params {dict(spec.params)}: {exc}"
            ) from None
        return Application(spec, policy, self._plugins, self._dispatcher, self._deadlines)

    def add(self, spec: AppSpec) -> Application:
        """Build and serve an application, with the policy state saved for it by the same
        policy restored (see :mod:`ketch.applications.state`); raises :class:`AppError`."""
        if spec.name in self._apps:
            raise AppError(f"application {spec.name!r} already exists")
        application = self.build(spec)
        saved = self._store.load(spec)
        if saved is not None:
            try:
                application.policy.load_state_dict(saved.state)
            except Exception as exc:
                why = f"policy {spec.policy!r} cannot load it: {type(exc).__name__}: {exc}"
                if saved.models == spec.models:
                    raise AppError(
                        f"application {spec.name!r}: {why}, from "
                        f"{self._store.path_of(spec.name)}; move the file away to start afresh"
                    ) from None
                # Learnt with other models (changed through the management API): expected
                # to be unusable by some policies, so not a reason to refuse to start.
                self._store.set_aside(spec.name, f"it was learnt with models {saved.models}; {why}")
                application = self.build(spec)
        self._apps[spec.name] = application
        return application

    def change(self, spec: AppSpec) -> tuple[Application, str | None]:
        """Serve application ``spec.name`` with a new spec from now on; returns it and why
        its policy starts afresh (None when it kept what it learnt: same policy, and its
        ``load_state_dict`` takes the old state for the new models and params). Raises
        :class:`AppError`, leaving the application as it was."""
        before = self.get(spec.name)
        policy = self.build(spec).policy
        afresh: str | None = None
        if spec.policy != before.spec.policy:
            afresh = f"the policy changed from {before.spec.policy!r} to {spec.policy!r}"
        else:
            try:
                policy.load_state_dict(before.policy.state_dict())
            except Exception as exc:
                afresh = (
                    f"policy {spec.policy!r} cannot take its previous state: "
                    f"{type(exc).__name__}: {exc}"
                )
                policy = self.build(spec).policy  # a failed load may have left it half-changed
        after = before.successor(spec, policy)
        if afresh is not None:
            log.warning("application %r starts learning afresh: %s", spec.name, afresh)
        self._apps[spec.name] = after
        return after, afresh

    def remove(self, name: str) -> Application:
        """Stop serving an application (queries in flight finish); its policy state is saved
        first, so adding it back with the same policy resumes it."""
        application = self.get(name)
        del self._apps[name]
        self._saver.save_now(application)
        return application

    def linking(self, name: str, version: str | None) -> list[str]:
        """Applications that would lose a model if version ``version`` (None: every version)
        of model ``name`` went away: those listing it by that version, and, when it is the
        last one, those listing it by name."""
        remaining = [v for v in self._dispatcher.versions(name) if v != version]
        found = []
        for app_name, application in sorted(self._apps.items()):
            for reference in application.spec.models:
                model, _, pinned = reference.partition(":")
                if model != name:
                    continue
                if (pinned and (version is None or pinned == version)) or (
                    not pinned and (version is None or not remaining)
                ):
                    found.append(app_name)
                    break
        return found

    def get(self, name: str) -> Application:
        try:
            return self._apps[name]
        except KeyError:
            raise PredictionError(
                404, f"unknown application {name!r}", apps=sorted(self._apps)
            ) from None

    def describe(self) -> list[dict[str, Any]]:
        return [self._apps[name].describe() for name in sorted(self._apps)]

    def __len__(self) -> int:
        return len(self._apps)

    def __contains__(self, name: object) -> bool:
        return name in self._apps

    def samples(self) -> list[AppSample]:
        """What the metrics read of each application at scrape time."""
        return [AppSample(name, app.counts["defaults"]) for name, app in self.items()]

    def items(self) -> list[tuple[str, Application]]:
        """``(name, application)`` pairs, sorted by name (for ``GET /metrics``)."""
        return sorted(self._apps.items())

    def start(self) -> None:
        """Save the policies' state as it changes (:mod:`ketch.applications.saving`)."""
        self._saver.start()

    async def stop(self) -> None:
        """Save what changed since the last save; no more saving after."""
        await self._saver.stop()


def build_applications(
    specs: Sequence[AppSpec],
    plugins: Plugins,
    dispatcher: Dispatcher,
    store: StateStore,
    deadlines: Deadlines,
) -> Applications:
    """Every declared application with its policy, its saved state restored; raises
    :class:`AppError` naming the application and what is wrong with it."""
    applications = Applications(store, plugins, dispatcher, deadlines)
    for spec in specs:
        applications.add(spec)
    return applications
