"""Every application and pipeline of a gateway: an application built from its spec (the
served file's, or the management API's), its policy's saved state restored, its answered
queries kept for feedback, its state saved as it learns; a pipeline
(:mod:`ketch.applications.pipeline`) from the served file's declaration. They share one
namespace: ``/apps/{name}/...`` is one or the other. With ``--state redis://`` the queries,
the feedback and the state are shared with the other gateways
(:mod:`ketch.applications.shared`); otherwise they live in this gateway and its state
directory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ketch.applications.memory import LocalQueries, Queries
from ketch.applications.pipeline import Pipeline
from ketch.applications.runner import Application
from ketch.applications.saving import StateSaver
from ketch.applications.state import StateStore
from ketch.errors import AppError
from ketch.observability.metrics import AppSample
from ketch.plugin_manager import PluginError, Plugins
from ketch.policy import Feedback, Query
from ketch.serving.admission import Deadlines
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import PredictionError
from ketch.specs.apps import AppSpec
from ketch.specs.pipelines import PipelineSpec

if TYPE_CHECKING:  # Redis's client takes 0.3 s to import: only with --state redis://
    from ketch.applications.shared import SharedState

log = logging.getLogger("ketch.apps")


class Applications:
    """Every application of the gateway: building them from their specs (the served file's,
    or the management API's), and saving their policies' state."""

    def __init__(
        self,
        store: StateStore,
        plugins: Plugins,
        dispatcher: Dispatcher,
        deadlines: Deadlines,
        shared: SharedState | None = None,
    ) -> None:
        """:param shared: the Redis that several gateways share (``--state redis://``);
        ``store`` is then its :class:`~ketch.applications.shared.RedisStateStore`."""
        self._apps: dict[str, Application] = {}
        self._pipelines: dict[str, Pipeline] = {}
        self._store = store
        self._plugins = plugins
        self._dispatcher = dispatcher
        self._deadlines = deadlines
        self._shared = shared
        self._feedback_log = None if shared is None else shared.feedback_log(self._teach)
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
        return Application(
            spec,
            policy,
            self._plugins,
            self._dispatcher,
            self._deadlines,
            self._queries_of(spec),
            self._feedback_log,
        )

    def _queries_of(self, spec: AppSpec) -> Queries:
        if self._shared is None:
            return LocalQueries(*spec.query_bounds())
        return self._shared.queries(spec.name, *spec.query_bounds())

    def _teach(self, name: str, query: Query, feedback: Feedback, applied: str) -> None:
        """A feedback from the shared stream at position ``applied``, for this gateway's
        policy of ``name`` (if it serves it): about the models its spec lists here, which an
        operator may have changed at this gateway only."""
        application = self._apps.get(name)
        if application is None:
            return
        application.applied = applied
        models = application.spec.models
        if not set(feedback.rewards) <= set(models):
            feedback = Feedback(
                feedback.reward,
                feedback.label,
                feedback.output,
                {m: p for m, p in feedback.predictions.items() if m in models},
                {m: r for m, r in feedback.rewards.items() if m in models},
            )
        application.observe(query, feedback)

    def add(self, spec: AppSpec) -> Application:
        """Build and serve an application, with the policy state saved for it by the same
        policy restored (see :mod:`ketch.applications.state`); raises :class:`AppError`."""
        if spec.name in self._apps:
            raise AppError(f"application {spec.name!r} already exists")
        if spec.name in self._pipelines:
            raise AppError(f"application {spec.name!r}: a pipeline has that name")
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
                        f"{self._store.where(spec.name)}; move it away to start afresh"
                    ) from None
                # Learnt with other models (changed through the management API): expected
                # to be unusable by some policies, so not a reason to refuse to start.
                self._store.set_aside(spec.name, f"it was learnt with models {saved.models}; {why}")
                application = self.build(spec)
                saved = None
        application.applied = None if saved is None else saved.applied
        self._apps[spec.name] = application
        if self._feedback_log is not None:
            self._feedback_log.follow(spec.name, application.applied)
        return application

    def add_pipeline(self, spec: PipelineSpec) -> Pipeline:
        """Serve a pipeline; raises :class:`AppError` for a name taken or a model the server
        does not serve."""
        if spec.name in self._apps:
            raise AppError(f"pipeline {spec.name!r}: an application has that name")
        if spec.name in self._pipelines:
            raise AppError(f"pipeline {spec.name!r} already exists")
        for reference in spec.models():
            name, _, version = reference.partition(":")
            try:
                self._dispatcher.queue_for(name, version or None)
            except PredictionError as exc:
                raise AppError(f"pipeline {spec.name!r} names {reference!r}: {exc}") from None
        pipeline = self._pipelines[spec.name] = Pipeline(spec, self._dispatcher, self._deadlines)
        return pipeline

    def change(self, spec: AppSpec) -> tuple[Application, str | None]:
        """Serve application ``spec.name`` with a new spec from now on; returns it and why
        its policy starts afresh (None when it kept what it learnt: same policy, and its
        ``load_state_dict`` takes the old state for the new models and params). Raises
        :class:`AppError`, leaving the application as it was."""
        before = self.application(spec.name)
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

    def remove(self, name: str) -> None:
        """Stop serving an application or a pipeline (queries in flight finish); an
        application's policy state is saved first, so adding it back with the same policy
        resumes it."""
        if self._pipelines.pop(name, None) is not None:
            return
        application = self.application(name)
        del self._apps[name]
        if self._feedback_log is not None:
            self._feedback_log.unfollow(name)
        self._saver.save_now(application)

    def linking(self, name: str, version: str | None) -> list[str]:
        """Applications and pipelines that would lose a model if version ``version`` (None:
        every version) of model ``name`` went away: those naming it by that version, and,
        when it is the last one, those naming it by name."""
        remaining = [v for v in self._dispatcher.versions(name) if v != version]
        found = []
        named = {n: list(a.spec.models) for n, a in self._apps.items()}
        named.update({n: p.spec.models() for n, p in self._pipelines.items()})
        for app_name, references in sorted(named.items()):
            for reference in references:
                model, _, pinned = reference.partition(":")
                if model != name:
                    continue
                if (pinned and (version is None or pinned == version)) or (
                    not pinned and (version is None or not remaining)
                ):
                    found.append(app_name)
                    break
        return found

    def get(self, name: str) -> Application | Pipeline:
        """The application or pipeline of that name (a 404 for neither)."""
        found = self._apps.get(name) or self._pipelines.get(name)
        if found is None:
            raise PredictionError(
                404,
                f"unknown application {name!r}",
                apps=sorted([*self._apps, *self._pipelines]),
            )
        return found

    def application(self, name: str) -> Application:
        """The application of that name: a 404 for an unknown one, a 400 for a pipeline
        (which no policy runs)."""
        if name in self._pipelines:
            raise PredictionError(
                400,
                f"{name!r} is a pipeline, not an application with a policy: remove it and "
                "declare it anew to change it",
                app=name,
            )
        found = self.get(name)
        assert isinstance(found, Application)
        return found

    def describe(self) -> list[dict[str, Any]]:
        every: dict[str, Application | Pipeline] = {**self._apps, **self._pipelines}
        return [every[name].describe() for name in sorted(every)]

    def __len__(self) -> int:
        return len(self._apps) + len(self._pipelines)

    def __contains__(self, name: object) -> bool:
        return name in self._apps or name in self._pipelines

    def samples(self) -> list[AppSample]:
        """What the metrics read of each application at scrape time."""
        return [AppSample(name, app.counts["defaults"]) for name, app in self.items()]

    def items(self) -> list[tuple[str, Application]]:
        """``(name, application)`` pairs, sorted by name (for ``GET /metrics``)."""
        return sorted(self._apps.items())

    def start(self) -> None:
        """Save the policies' state as it changes (:mod:`ketch.applications.saving`), and
        learn from the other gateways' feedback (shared state)."""
        self._saver.start()
        if self._feedback_log is not None:
            self._feedback_log.start()

    async def stop(self) -> None:
        """Save what changed since the last save; no more saving after."""
        if self._feedback_log is not None:
            await self._feedback_log.stop()
        await self._saver.stop()


def build_applications(
    specs: Sequence[AppSpec],
    pipelines: Sequence[PipelineSpec],
    plugins: Plugins,
    dispatcher: Dispatcher,
    store: StateStore,
    deadlines: Deadlines,
    shared: SharedState | None = None,
) -> Applications:
    """Every declared application with its policy, its saved state restored, and every
    declared pipeline; raises :class:`AppError` naming the one and what is wrong with it."""
    applications = Applications(store, plugins, dispatcher, deadlines, shared)
    for spec in specs:
        applications.add(spec)
    for pipeline in pipelines:
        applications.add_pipeline(pipeline)
    return applications
