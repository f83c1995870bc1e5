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
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from ketch.applications.memory import AnsweredQuery, Queries, encoded_size
from ketch.applications.state import SharedStateError
from ketch.plugin_manager import PluginError, Plugins
from ketch.policy import Combined, Feedback, Policy, Query
from ketch.serving.admission import Deadlines, predict
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import Deadline, PredictionError
from ketch.specs.apps import AppSpec

if TYPE_CHECKING:  # Redis's client takes 0.3 s to import: only with --state redis://
    from ketch.applications.shared import FeedbackLog

log = logging.getLogger("ketch.apps")


class Application:
    """One application: its policy, its models' queues, and its remembered queries."""

    def __init__(
        self,
        spec: AppSpec,
        policy: Policy,
        plugins: Plugins,
        dispatcher: Dispatcher,
        deadlines: Deadlines,
        queries: Queries,
        feedback_log: FeedbackLog | None = None,
    ) -> None:
        """:param queries: where its answered queries wait for their feedback.
        :param feedback_log: with ``--state redis://``, the stream through which feedback
            teaches every gateway's policy; None teaches this one's directly."""
        self.spec = spec
        self.policy = policy
        self._plugins = plugins
        self._dispatcher = dispatcher
        self._deadlines = deadlines
        self._plugin = plugins.plugin_of_policy(spec.policy)
        self._queries = queries
        self._feedback_log = feedback_log
        self._background: set[asyncio.Future[Any]] = set()
        self.dirty = False
        #: The feedback stream's position its policy has learnt up to (shared state only).
        self.applied: str | None = None
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
        record = AnsweredQuery(query)
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
        await self._queries.remember(record)
        self._plugins.query_answered(self.spec.name, query, answer)
        return answer

    def _ask(
        self,
        models: Sequence[str],
        tasks: dict[str, asyncio.Future[Any]],
        record: AnsweredQuery,
        failures: dict[str, PredictionError],
        deadline: Deadline,
    ) -> None:
        for reference in models:
            task = asyncio.ensure_future(self._ask_model(reference, record.query.input, deadline))
            task.add_done_callback(_arrival(reference, record, failures, self._queries))
            tasks[reference] = task

    async def _ask_model(self, reference: str, value: Any, deadline: Deadline) -> Any:
        name, _, version = reference.partition(":")
        queue = self._dispatcher.queue_for(name, version or None)
        outputs = await predict(queue, [value], deadline)
        return plain_value(outputs[0])

    def _combined(
        self, query: Query, in_time: dict[str, Any], missing: dict[str, str], record: AnsweredQuery
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
        used = list(in_time) if combined.models is None else list(combined.models)
        if isinstance(combined.models, str) or not used or not set(used) <= set(in_time):
            raise self._policy_error(
                "combine",
                f"named the models {combined.models!r} as making its output, not a non-empty "
                f"list among those that answered {list(in_time)!r}",
            )
        output = plain_value(combined.output)
        try:
            orjson.dumps(output, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError as exc:
            raise self._policy_error(
                "combine", f"gave an output that is not JSON ({exc})"
            ) from None
        record.output, record.used = output, used
        return {
            "output": output,
            "query_id": query.id,
            "app": self.spec.name,
            "default": False,
            "models": used,
            "confidence": confidence,
            "missing": missing,
        }

    def _default(
        self,
        query: Query,
        missing: dict[str, str],
        failures: dict[str, PredictionError],
        budget_s: float,
        record: AnsweredQuery,
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
        record: AnsweredQuery,
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

    # -- feedback ---------------------------------------------------------------------------

    async def feedback(
        self, query_id: str, reward: float | None, label: Any, has_label: bool
    ) -> dict[str, Any]:
        """Teach the policy about one answered query; raises :class:`PredictionError`."""
        try:
            record = await self._queries.recall(query_id)
            if record is None:
                # Never answered, or forgotten past the bounds: the client cannot tell which,
                # and the answer is the same.
                max_queries, max_bytes = self.spec.query_bounds()
                raise PredictionError(
                    404,
                    f"application {self.spec.name!r} has no query {query_id!r}: feedback must "
                    f"name a query_id it answered, and it keeps only its latest queries (at "
                    f"most {max_queries} and {max_bytes} bytes of them, set by its "
                    f"query_memory {self.spec.query_memory!r})",
                    app=self.spec.name,
                )
            if not await self._queries.claim(record):
                raise PredictionError(
                    409, f"query {query_id!r} already had its feedback", app=self.spec.name
                )
            feedback = self._feedback_of(record, reward, label, has_label)
            if self._feedback_log is None:
                self.observe(record.query, feedback)
            else:
                await self._feedback_log.publish(record.query, feedback)
        except SharedStateError as exc:
            raise PredictionError(503, str(exc), app=self.spec.name) from None
        self._plugins.feedback_observed(self.spec.name, record.query, feedback)
        return {
            "query_id": query_id,
            "app": self.spec.name,
            "reward": feedback.reward,
            "rewards": dict(feedback.rewards),
        }

    def _feedback_of(
        self, record: AnsweredQuery, reward: float | None, label: Any, has_label: bool
    ) -> Feedback:
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
        return Feedback(reward, label if has_label else None, record.output, predictions, rewards)

    def observe(self, query: Query, feedback: Feedback) -> None:
        """Teach the policy one feedback, about its own models only; raises
        :class:`PredictionError`."""
        self.dirty = True
        self._call("observe", self.policy.observe, query, feedback)
        self.counts["feedback"] += 1

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
        after = Application(
            spec,
            policy,
            self._plugins,
            self._dispatcher,
            self._deadlines,
            self._queries,
            self._feedback_log,
        )
        self._queries.bound(*spec.query_bounds())
        after._background = self._background
        after.counts = self.counts
        after.applied = self.applied
        after.dirty = True
        return after

    def describe(self) -> dict[str, Any]:
        try:
            state: Any = self.policy.state_dict()
        except Exception as exc:
            state = {"error": f"state_dict() raised {type(exc).__name__}: {exc}"}
        return {
            **self.spec.to_dict(),
            "kind": "application",
            "plugin": self._plugin,
            **self.counts,
            "queries_held": self._queries.held()[0],
            "query_bytes_held": self._queries.held()[1],
            "policy_state": state,
        }


def _arrival(
    reference: str,
    record: AnsweredQuery,
    failures: dict[str, PredictionError],
    queries: Queries,
) -> Callable[[asyncio.Future[Any]], None]:
    """Done-callback of a model's task: keep its prediction, or why it has none."""

    def arrived(task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            prediction = record.predictions[reference] = task.result()
            if record.kept:  # a straggler or a mirror, after the answer
                queries.grew(record, encoded_size(prediction))
        elif isinstance(error, PredictionError):
            failures[reference] = error
        else:
            failures[reference] = PredictionError(500, f"{type(error).__name__}: {error}")

    return arrived


def _why_missing(error: PredictionError | None, budget_s: float) -> str:
    if error is None or error.status == 504:
        return f"no answer within {budget_s * 1000:g} ms"
    return f"{error.status}: {error.body['error']}"


def plain_value(value: Any) -> Any:
    """Numpy values as the JSON-like values policies and answers hold (lists and Python
    numbers)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
