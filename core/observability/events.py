"""What ``ketch serve`` tells people and scripts: one :class:`Event` per state change.

The dispatcher and the server build events with the functions below instead of formatting
lines, so the same fact comes out either as today's ``ketch: ...`` line (:meth:`Event.text`,
which tests, benchmarks and users' scripts wait for, so it must not change) or as one JSON
object per line (:meth:`Event.json`, ``ketch serve --log-format json``) without parsing text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TextIO

if TYPE_CHECKING:
    from ketch.specs.models import ModelSpec
    from ketch.zmq_transport.broker import WorkerInfo

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")


@dataclass(frozen=True, slots=True)
class Event:
    """One state change: ``kind`` names it in JSON, ``message`` is the human line without its
    ``ketch: `` prefix, ``fields`` are the facts behind the message."""

    kind: str
    message: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        return f"ketch: {self.message}"

    def json(self, now: datetime | None = None) -> str:
        record = {"ts": _timestamp(now), "event": self.kind, **self.fields}
        return json.dumps(record, default=str)


Report = Callable[[Event], None]


def _timestamp(now: datetime | None = None) -> str:
    """UTC with milliseconds and a ``Z``, the form log pipelines parse without help."""
    moment = now if now is not None else datetime.now(UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _model(spec: ModelSpec) -> dict[str, Any]:
    return {"model": spec.name, "version": spec.version}


def _worker(worker: WorkerInfo[ModelSpec]) -> dict[str, Any]:
    return {**_model(worker.spec), "pid": worker.pid, "host": worker.host}


# -- the events ------------------------------------------------------------------------------


def broker_listening(endpoint: str) -> Event:
    return Event("broker_listening", f"broker listening on {endpoint}", {"endpoint": endpoint})


def worker_refused(peer: str, reason: str) -> Event:
    """A peer failed the broker's CURVE handshake; said once per peer and reason (each one is
    counted in ``ketch_broker_refused_total``)."""
    return Event(
        "worker_refused",
        f"refused a worker connection from {peer}: {reason}",
        {"peer": peer, "reason": reason},
    )


def listening(url: str) -> Event:
    return Event("listening", f"listening on {url}", {"url": url})


def grpc_listening(address: str) -> Event:
    return Event("grpc_listening", f"grpc listening on {address}", {"address": address})


def app_started(name: str, policy: str, models: list[str]) -> Event:
    return Event(
        "app",
        f"app {name}: policy {policy} over {', '.join(models)}",
        {"app": name, "policy": policy, "models": models},
    )


def ready() -> Event:
    return Event("ready", "ready")


def stopped() -> Event:
    return Event("stopped", "stopped")


def template_ready(spec: ModelSpec, pid: int, rss_mb: Any) -> Event:
    return Event(
        "template_ready",
        f"model {spec.label()} template ready: pid {pid}, "
        f"{rss_mb} MB with the model's imports preloaded",
        {**_model(spec), "pid": pid, "rss_mb": rss_mb},
    )


def template_starting(spec: ModelSpec, pid: int) -> Event:
    return Event(
        "template_starting",
        f"model {spec.label()} template starting: pid {pid}",
        {**_model(spec), "pid": pid},
    )


def model_unhealthy(spec: ModelSpec, cause: str) -> Event:
    return Event(
        "model_unhealthy",
        f"model {spec.label()} unhealthy: {cause}",
        {**_model(spec), "reason": cause},
    )


def model_crash_looping(spec: ModelSpec, cause: str, delay_s: float) -> Event:
    return Event(
        "model_crash_looping",
        f"model {spec.label()} crash-looping: {cause}; next attempt in {delay_s:.1f} s",
        {**_model(spec), "reason": cause, "next_attempt_in_s": round(delay_s, 3)},
    )


def model_ready(worker: WorkerInfo[ModelSpec]) -> Event:
    return Event(
        "model_ready", f"model {worker.spec.label()} ready: {worker.describe()}", _worker(worker)
    )


def worker_lost(worker: WorkerInfo[ModelSpec], reason: str) -> Event:
    return Event(
        "worker_lost",
        f"model {worker.spec.label()} lost {worker.describe()}: {reason}",
        {**_worker(worker), "reason": reason},
    )


def scaled_to_zero(spec: ModelSpec, idle_s: float) -> Event:
    return Event(
        "scaled_to_zero",
        f"model {spec.label()} scaled to zero after {idle_s:g} s without requests",
        {**_model(spec), "idle_timeout_s": idle_s},
    )


def model_added(spec: ModelSpec, default: str | None) -> Event:
    serves = (
        "it answers requests without a version"
        if default == spec.version
        else f"requests without a version still go to {default}"
    )
    return Event(
        "model_added",
        f"model {spec.label()} added ({spec.runtime}: {spec.artifact}); {serves}",
        {**_model(spec), "runtime": spec.runtime, "artifact": spec.artifact, "default": default},
    )


def model_removed(spec: ModelSpec) -> Event:
    return Event("model_removed", f"model {spec.label()} removed", _model(spec))


def default_version_changed(name: str, version: str, previous: str) -> Event:
    return Event(
        "default_version",
        f"model {name}: requests without a version go to {version} (was {previous})",
        {"model": name, "version": version, "previous": previous},
    )


def pool_changed(spec: ModelSpec) -> Event:
    pool = spec.pool
    return Event(
        "pool_changed",
        f"model {spec.label()} pool: {pool.min_replicas}-{pool.max_replicas} replicas",
        {**_model(spec), "min_replicas": pool.min_replicas, "max_replicas": pool.max_replicas},
    )


def plan_applied(spec: ModelSpec, renewing: bool) -> Event:
    """A plan applied through the management API to one model version."""
    threads = spec.resources.threads
    renewed = ", its workers renewed with the new threads" if renewing else ""
    return Event(
        "plan_applied",
        f"model {spec.label()} planned: batches of up to {spec.max_batch_size}, "
        f"{spec.max_delay_ms:g} ms delay, {spec.pool.min_replicas} replicas, "
        f"{threads} threads{renewed}",
        {
            **_model(spec),
            "max_batch_size": spec.max_batch_size,
            "max_delay_ms": spec.max_delay_ms,
            "replicas": spec.pool.min_replicas,
            "threads": threads,
        },
    )


def app_changed(name: str, policy: str, models: list[str], afresh: str | None) -> Event:
    state = "its policy keeps what it learnt" if afresh is None else f"afresh: {afresh}"
    return Event(
        "app_changed",
        f"app {name} changed: policy {policy} over {', '.join(models)}; {state}",
        {"app": name, "policy": policy, "models": models, "afresh": afresh},
    )


def pipeline_started(name: str, models: list[str]) -> Event:
    return Event(
        "pipeline_started",
        f"pipeline {name} serving {' -> '.join(models)}",
        {"pipeline": name, "models": models},
    )


def app_removed(name: str) -> Event:
    return Event("app_removed", f"app {name} removed", {"app": name})


def changes_applied(count: int) -> Event:
    """At start: the management changes the other gateways made, applied here too."""
    return Event(
        "changes_applied",
        f"applied {count} management changes the gateways share",
        {"changes": count},
    )


# -- output ----------------------------------------------------------------------------------


def env_building(key: str, what: str) -> Event:
    return Event(
        "env_building", f"building environment {key} ({what})", {"env": key, "requirements": what}
    )


def env_built(key: str, seconds: float) -> Event:
    return Event(
        "env_built", f"environment {key} built in {seconds:.1f} s", {"env": key, "build_s": seconds}
    )


def deployed(name: str, version: int, models: list[str]) -> Event:
    return Event(
        "deployed",
        f"deployed {name} version {version}: {', '.join(models)}",
        {"deployment": name, "version": version, "models": models},
    )


def deploy_failed(name: str, version: int, error: str) -> Event:
    return Event(
        "deploy_failed",
        f"deploy of {name} version {version} failed: {error}",
        {"deployment": name, "version": version, "error": error},
    )


def deployment_removed(name: str, version: int) -> Event:
    return Event(
        "deployment_removed",
        f"removed {name} version {version}",
        {"deployment": name, "version": version},
    )


def write_event(event: Event, out: TextIO, log_format: LogFormat) -> None:
    line = event.json() if log_format == "json" else event.text()
    print(line, file=out, flush=True)  # flushed: scripts wait for these lines through a pipe


class JsonLogFormatter(logging.Formatter):
    """``logging`` records as one JSON object per line, for ``--log-format json``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
