"""The dispatcher: routes requests to model queues, places each worker that says READY in the
queue of its model (which then receives its replies straight from the broker), and tracks
local worker processes from their start to their READY, so ``GET /models`` can say
``starting`` and a process exit becomes an immediate drop."""

from __future__ import annotations

import itertools
import re
import time
from typing import TYPE_CHECKING, Any

from ketch.observability import events
from ketch.observability.metrics import Metrics
from ketch.serving import announced, status
from ketch.serving.jobs import Backoff, PredictionError
from ketch.serving.queue import ModelQueue
from ketch.serving.sequence_queue import queue_class
from ketch.serving.sink import ProcessKey, Worker, WorkerLink, process_of
from ketch.specs.models import ModelSpec

if TYPE_CHECKING:
    from ketch.plugin_manager import Plugins


#: Distinct refusals said before the memory of them starts afresh (a bound, not a cache).
_MAX_REFUSALS_REMEMBERED = 10_000


def version_order(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for versions: numeric parts compare as numbers, so "10" is above "9"."""
    return tuple(
        (0, int(piece)) if piece.isdigit() else (1, piece) for piece in re.split(r"[.\-_]", version)
    )


class Dispatcher:
    """Routes requests to model queues and broker events to the queue of the worker's model.

    :param report: receives one :class:`~ketch.observability.events.Event` per state change
        (worker ready or lost, template started, model unhealthy, pool back to zero).
    :param allow_worker_models: admit a worker for a model version this server does not
        serve, adding the model for as long as such workers stay (``--allow-worker-models``);
        otherwise its READY is refused.
    """

    def __init__(self, report: events.Report, *, allow_worker_models: bool = False) -> None:
        self._report = report
        self._allow_worker_models = allow_worker_models
        #: Refusals already reported, so a worker that keeps trying is said once.
        self._refusals_said: set[tuple[str, str, str]] = set()
        self._queues: dict[tuple[str, str], ModelQueue] = {}
        self._defaults: dict[str, str] = {}
        #: Versions an operator made the default (rolled to); other models default to
        #: their highest version.
        self._pinned: dict[str, str] = {}
        #: Removed model versions whose queued requests are still finishing: their workers'
        #: replies must still reach them.
        self._draining: dict[tuple[str, str], ModelQueue] = {}
        #: Model versions removed through the management API: their workers are sent away.
        self._removed: set[tuple[str, str]] = set()
        self._batch_ids = itertools.count(1).__next__
        self._broker: WorkerLink | None = None
        self._observers: Plugins | None = None
        #: This server's Prometheus metrics; the gauges read the queues at scrape time.
        self.metrics = Metrics()
        self.metrics.watch_queues(lambda: [status.sample(queue) for queue in self.queues()])

    def attach(self, broker: WorkerLink, observers: Plugins | None = None) -> None:
        """Route batches through ``broker``; ``observers`` are told of each batch and request
        done by the queues."""
        self._broker = broker
        self._observers = observers

    def add_model(self, spec: ModelSpec, *, served_from_file: bool = True) -> ModelQueue:
        queue = self._queue_of(spec.key)
        if queue is None:
            assert self._broker is not None, "attach a broker before adding models"
            model_metrics = self.metrics.for_model(spec.name, spec.version)
            make = queue_class(spec)
            queue = make(spec, self._broker, self._batch_ids, model_metrics, self._observers)
            self._queues[spec.key] = queue
            self._removed.discard(spec.key)
            self._choose_default(spec.name)
        queue.served_from_file = queue.served_from_file or served_from_file
        return queue

    def remove_model(self, key: tuple[str, str], why: str) -> ModelQueue:
        """Take a model version out of routing: new requests no longer reach it (those
        without a version go to the model's next default), and its workers that join later
        are sent away. Requests already queued finish on it; see
        :meth:`ModelQueue.wait_drained`."""
        queue = self._unroute(key)
        queue.removed_because = why
        self._draining[key] = queue
        self._removed.add(key)
        return queue

    def _unroute(self, key: tuple[str, str]) -> ModelQueue:
        """Take a model version's queue out of routing, its name to its next default."""
        queue = self._queues.pop(key)
        name, version = key
        if self._pinned.get(name) == version:
            del self._pinned[name]
        self._choose_default(name)
        return queue

    def forget(self, key: tuple[str, str]) -> None:
        """A removed model version has drained: nothing more of it is routed anywhere."""
        self._draining.pop(key, None)

    def _queue_of(self, key: tuple[str, str]) -> ModelQueue | None:
        """The queue of a worker's model: a served one, or one removed and still draining."""
        queue = self._queues.get(key)
        return queue if queue is not None else self._draining.get(key)

    def set_default(self, name: str, version: str) -> str:
        """Send requests without a version to ``version`` from now on; returns the previous
        default. Requests already queued on the previous one finish there."""
        previous = self._defaults[name]
        self._pinned[name] = version
        self._choose_default(name)
        return previous

    def pin_default(self, name: str) -> None:
        """Keep the current default of ``name`` even when a higher version is added."""
        if name in self._defaults:
            self._pinned.setdefault(name, self._defaults[name])

    def _choose_default(self, name: str) -> None:
        versions = [v for (n, v) in self._queues if n == name]
        if not versions:
            self._defaults.pop(name, None)
            self._pinned.pop(name, None)
        elif self._pinned.get(name) in versions:
            self._defaults[name] = self._pinned[name]
        else:
            self._defaults[name] = max(versions, key=version_order)

    def default_version(self, name: str) -> str | None:
        return self._defaults.get(name)

    def versions(self, name: str) -> list[str]:
        return sorted((v for (n, v) in self._queues if n == name), key=version_order)

    # -- lookups ----------------------------------------------------------------------------

    def knows_model(self, name: str) -> bool:
        """Whether some version of a model of this name is served."""
        return name in self._defaults

    def has_model(self, key: tuple[str, str]) -> bool:
        return key in self._queues

    def queue_for(self, name: str, version: str | None) -> ModelQueue:
        default = self._defaults.get(name)
        if default is None:
            # Worded as Triton words it: its clients and scripts look for this text.
            raise PredictionError(
                404,
                f"Request for unknown model: {name!r} is not found",
                models=sorted(self._defaults),
            )
        queue = self._queues.get((name, version if version is not None else default))
        if queue is None:
            raise PredictionError(
                404,
                f"model {name!r} has no version {version!r}",
                model=name,
                versions=self.versions(name),
            )
        return queue

    def describe(self) -> list[status.ModelStatus]:
        return [
            status.describe(queue, self._defaults[name])
            for (name, _), queue in sorted(
                self._queues.items(), key=lambda kv: (kv[0][0], version_order(kv[0][1]))
            )
        ]

    def not_ready(self) -> list[str]:
        """Labels of models from the served file that cannot serve now."""
        return [
            q.spec.label()
            for q in self._queues.values()
            if q.served_from_file and not status.ready_to_serve(q)
        ]

    def settled(self) -> bool:
        """Every model of the served file can serve, or was given up on as unhealthy, and no
        worker of a model still served is starting."""
        return not any(
            status.state_of(q) != "unhealthy"
            and (q.starting or (q.served_from_file and not status.ready_to_serve(q)))
            for q in self._queues.values()
        )

    def queues(self) -> list[ModelQueue]:
        return list(self._queues.values())

    def recycle(self, spec: ModelSpec, process: ProcessKey, why: str) -> None:
        """A worker the pool started was killed for cause: its batches fail with ``why``
        (retrying them would likely kill the next worker the same way) and it leaves its pool
        at once."""
        queue = self._queue_of(spec.key)
        assert self._broker is not None
        for worker in self._workers_of(process):
            if queue is not None:
                queue.fail_in_flight(worker, PredictionError(503, why, **queue.labels()))
            self._broker.drop(worker, why)

    def scaled_to_zero(self, spec: ModelSpec) -> None:
        """The pool manager let the last worker of ``spec`` go for idleness: say so, since
        the next request pays a cold start."""
        self._report(events.scaled_to_zero(spec, spec.pool.idle_timeout_s))

    def retire_all(self, key: tuple[str, str], reason: str) -> list[Worker]:
        """Tell every worker of a model version, local or remote, to leave (DISCONNECT)."""
        assert self._broker is not None
        leaving = [w for w in self._broker.workers() if w.spec.key == key]
        for worker in leaving:
            self._broker.drop(worker, reason)
        return leaving

    def retire(self, worker: Worker, reason: str) -> None:
        """Let an idle worker go: it is told DISCONNECT and leaves its pool."""
        assert self._broker is not None
        self._broker.drop(worker, reason)

    # -- the processes the pools started (from the supervisor) ------------------------------

    # A process event of a version no longer served (removed, or removed and forgotten) must
    # not bring it back: these look its queue up, never add one.

    def process_started(self, spec: ModelSpec, process: ProcessKey) -> None:
        queue = self._queue_of(spec.key)
        if queue is not None:
            queue.process_started(process)

    def process_exited(
        self, spec: ModelSpec, process: ProcessKey, how: str, expected: bool
    ) -> None:
        assert self._broker is not None
        for worker in self._workers_of(process):
            self._broker.drop(worker, how)
        queue = self._queue_of(spec.key)
        if queue is not None:
            queue.process_exited(process, how, expected)

    def _workers_of(self, process: ProcessKey) -> list[Worker]:
        """The broker's workers that are ``process`` (one, or none yet)."""
        assert self._broker is not None
        return [w for w in self._broker.workers() if process_of(w) == process]

    def template_changed(self, spec: ModelSpec, template: dict[str, Any] | None) -> None:
        queue = self._queue_of(spec.key)
        if queue is None:
            return
        queue.template_changed(template)
        if template is None:
            return
        if template["state"] == "ready":
            self._report(events.template_ready(spec, template["pid"], template["rss_mb"]))
        else:
            self._report(events.template_starting(spec, template["pid"]))

    def model_crash_looping(
        self, spec: ModelSpec, cause: str, quick_exits: int, delay_s: float
    ) -> None:
        queue = self._queue_of(spec.key)
        if queue is None:
            return
        next_attempt_at = time.monotonic() + delay_s
        queue.back_off(Backoff(cause, quick_exits, delay_s, next_attempt_at))
        self._report(events.model_crash_looping(spec, cause, delay_s))

    def model_unhealthy(self, spec: ModelSpec, cause: str) -> None:
        queue = self._queue_of(spec.key)
        if queue is None:
            return
        queue.mark_unhealthy(cause)
        self._report(events.model_unhealthy(spec, cause))

    # -- broker events ----------------------------------------------------------------------

    def admit(self, worker: Worker) -> str | None:
        refusal = self._refusal(worker)
        if refusal is not None:
            self._ready_refused(worker.describe(), (worker.host, worker.spec.label()), refusal)
        return refusal

    def ready_invalid(self, reason: str) -> None:
        self._ready_refused("a peer", ("", ""), reason)

    def _ready_refused(self, peer: str, who: tuple[str, str], reason: str) -> None:
        """Count a refused READY; report it once per host, model and reason."""
        self.metrics.broker_refused.labels(stage="admission").inc()
        said = (*who, reason)
        if said not in self._refusals_said:
            if len(self._refusals_said) >= _MAX_REFUSALS_REMEMBERED:
                self._refusals_said.clear()
            self._refusals_said.add(said)
            self._report(events.worker_refused(peer, reason))

    def _refusal(self, worker: Worker) -> str | None:
        """Why ``worker`` may not join, or None."""
        label = worker.spec.label()
        if worker.spec.key in self._removed:
            return f"model {label!r} was removed"
        queue = self._queues.get(worker.spec.key)
        if queue is None:
            if self._allow_worker_models:
                return None
            served = ", ".join(sorted(q.spec.label() for q in self._queues.values())) or "none"
            return (
                f"this gateway does not serve model {label!r} (it serves: {served}); "
                "`ketch serve --allow-worker-models` lets workers add models"
            )
        return announced.mismatch(queue.spec, worker.spec)

    def worker_ready(self, worker: Worker) -> None:
        queue = self._queues.get(worker.spec.key)
        if queue is None:
            # A worker started by hand for a model the served file does not define, admitted
            # with --allow-worker-models: the model lasts as long as such workers do.
            queue = self.add_model(worker.spec, served_from_file=False)
        process = process_of(worker)
        if process is not None:
            queue.process_ready(process)
        queue.spec = announced.learnt(queue.spec, worker.spec)
        queue.add_worker(worker)
        self._report(events.model_ready(worker))

    def peer_refused(self, peer: str, reason: str, first: bool) -> None:
        self.metrics.broker_refused.labels(stage="handshake").inc()
        if first:
            self._report(events.worker_refused(peer, reason))

    def worker_lost(self, worker: Worker, reason: str) -> None:
        queue = self._queue_of(worker.spec.key)
        if queue is not None:
            queue.remove_worker(worker, reason)
        self._report(events.worker_lost(worker, reason))
        if queue is not None and queue.abandoned and self._queues.get(queue.spec.key) is queue:
            # Only workers defined it, and the last one left: the model goes with them (and
            # may come back with them: it is not removed, nothing of it is left to drain).
            self._unroute(queue.spec.key)
            self._report(events.model_removed(queue.spec))
