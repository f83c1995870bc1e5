"""Why a model queue did not answer a request with outputs: one builder per reason, each an HTTP
status and a message that names the model version, the value that was wrong and what to do.

Every error carries the ``model`` and ``version`` details of :func:`labels`.
"""

from __future__ import annotations

import math

from ketch.serving.jobs import Backoff, Binding, PredictionError
from ketch.specs.models import ModelSpec
from ketch.zmq_transport.broker import RemoteError
from ketch.zmq_transport.protocol import ErrorKind


def labels(spec: ModelSpec) -> dict[str, str]:
    """The ``model`` and ``version`` details every error about a model version carries."""
    return {"model": spec.name, "version": spec.version}


def queue_full(spec: ModelSpec, queued: int, drain_rate: float) -> PredictionError:
    """429, with a ``Retry-After`` from how fast the queue has been draining."""
    retry_after = 1
    if drain_rate > 0:
        retry_after = max(1, min(60, math.ceil(queued / drain_rate)))
    return _retry_later(
        429,
        f"model {spec.label()!r} has {queued} inputs waiting, its max_queue is "
        f"{spec.max_queue}: retry after {retry_after} s",
        spec,
        retry_after,
    )


def _retry_later(status: int, message: str, spec: ModelSpec, after_s: int) -> PredictionError:
    """An error whose answer carries ``Retry-After: after_s``."""
    error = PredictionError(status, message, **labels(spec))
    error.headers["Retry-After"] = str(after_s)
    return error


def deadline_passed(spec: ModelSpec, timeout_s: float, computing: bool) -> PredictionError:
    where = (
        "while its batch was computing"
        if computing
        else "before a worker was free, so it was never computed"
    )
    return PredictionError(
        504,
        f"model {spec.label()!r} did not answer within {timeout_s * 1000:g} ms: the request's "
        f"deadline passed {where}",
        **labels(spec),
    )


def unhealthy(spec: ModelSpec, cause: str | None) -> PredictionError:
    return PredictionError(
        503,
        f"model {spec.label()!r} is unhealthy and no longer served: {cause}; fix it and restart "
        "ketch (or remove it and add it again through the management API)",
        **labels(spec),
    )


def backing_off(spec: ModelSpec, backoff: Backoff, now: float) -> PredictionError:
    """503 with ``Retry-After``: a crash-looping model without a worker, before its next try."""
    retry_after = backoff.retry_after_s(now)
    return _retry_later(
        503,
        f"model {spec.label()!r} has no worker: it is crash-looping ({backoff.cause}); the next "
        f"worker starts in {retry_after} s",
        spec,
        retry_after,
    )


def removed(spec: ModelSpec, why: str) -> PredictionError:
    return PredictionError(404, why, **labels(spec))


def no_worker(spec: ModelSpec) -> PredictionError:
    return PredictionError(
        503,
        f"no worker serves model {spec.label()!r}: its workers were started by hand and have "
        "all left; start one with `ketch worker`",
        **labels(spec),
    )


def no_cold_start(spec: ModelSpec, still_starting: bool, last_error: str | None) -> PredictionError:
    cause = "a worker is still starting" if still_starting else "no worker could start"
    if last_error is not None:
        cause = f"{cause}; the last attempt: {last_error}"
    return PredictionError(
        503,
        f"model {spec.label()!r} got no worker within {spec.pool.cold_start_timeout_s:g} s "
        f"({cause})",
        **labels(spec),
    )


def not_ready(spec: ModelSpec, timeout_s: float, last_error: str | None) -> PredictionError:
    cause = f"; the last attempt: {last_error}" if last_error else ""
    return PredictionError(
        503,
        f"model {spec.label()!r} has no worker ready after {timeout_s:g} s{cause}",
        **labels(spec),
    )


def worker_lost(spec: ModelSpec, worker: str, reason: str, attempts: int) -> PredictionError:
    return PredictionError(
        503,
        f"{worker} was lost while computing this request ({reason}), after {attempts} attempts",
        **labels(spec),
    )


def wrong_output_count(spec: ModelSpec, worker: str, outputs: int, batch: int) -> PredictionError:
    return PredictionError(
        500, f"{worker} returned {outputs} outputs for a batch of {batch}", **labels(spec)
    )


def batch_failed(spec: ModelSpec, remote: RemoteError) -> PredictionError:
    """What a worker's ERROR means for the requests of its batch."""
    if remote.kind is ErrorKind.MODEL:
        return PredictionError(
            500,
            f"model {spec.label()!r} raised {remote.type}: {remote.message}",
            type=remote.type,
            message=remote.message,
            **labels(spec),
        )
    status = 400 if remote.kind is ErrorKind.BAD_INPUT else 500
    return PredictionError(status, remote.message, type=remote.type, **labels(spec))


def unsendable(spec: ModelSpec, why: str) -> PredictionError:
    return PredictionError(400, why, **labels(spec))


def sequence_lost(spec: ModelSpec, binding: Binding) -> PredictionError:
    """503: a sequence's worker was lost (or stalled) with its step, and the state it kept."""
    return PredictionError(
        503,
        f"sequence {binding.sequence_id!r} of model {spec.label()!r} is over: {binding.ended}, "
        "and with it the state the sequence had; start it again with sequence_start",
        **labels(spec),
        sequence_id=binding.sequence_id,
    )
