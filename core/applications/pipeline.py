"""Pipelines at run time: each query through the steps of its :class:`PipelineSpec`.

Each step asks its model(s) through their queues (cache, batching, workers), with the query's
one deadline, so a step that cannot answer in time is never computed once it is late, and a
later step gets only what the earlier ones left. The answer says which models made the output
(a model run when unsure replaces the one it overrode; a skipped one made nothing) and what
each step did, and every step keeps counts and latencies for ``GET /apps``: how often it ran
per query (the share of queries that reach it) is what a plan sizes its pool by.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from ketch.applications.runner import plain_value
from ketch.policy import confidence_of
from ketch.serving.admission import Deadlines, predict
from ketch.serving.dispatcher import Dispatcher
from ketch.serving.jobs import Deadline, PredictionError
from ketch.specs.pipelines import Parallel, PipelineSpec, Stage, Step, WhenUnsure

#: Latencies each step keeps for its percentiles (the latest ones).
LATENCY_SAMPLES = 2048


class Latencies:
    """The latest latencies of something, for its median and 99th percentile."""

    def __init__(self) -> None:
        self._samples: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)

    def describe(self) -> dict[str, float | None]:
        if not self._samples:
            return {"p50": None, "p99": None}
        p50, p99 = np.percentile(np.fromiter(self._samples, float), [50, 99])
        return {"p50": round(float(p50) * 1000, 3), "p99": round(float(p99) * 1000, 3)}


class StepCounts:
    """What one step did over the pipeline's queries."""

    def __init__(self) -> None:
        self.runs = 0
        self.skipped = 0
        self.errors = 0
        self.latency = Latencies()


class Pipeline:
    """One pipeline: its steps, the queues of their models, and their counts."""

    def __init__(self, spec: PipelineSpec, dispatcher: Dispatcher, deadlines: Deadlines) -> None:
        self.spec = spec
        self._dispatcher = dispatcher
        self._deadlines = deadlines
        self.counts = {"queries": 0, "errors": 0}
        self.latency = Latencies()
        self.steps = [StepCounts() for _ in spec.steps]

    async def predict(self, value: Any, timeout_ms: float | None) -> dict[str, Any]:
        """The answer to one query, as the JSON body; raises :class:`PredictionError`."""
        self.counts["queries"] += 1
        started = time.monotonic()
        try:
            answer = await self._run(value, self._deadlines.deadline(timeout_ms, self.spec.slo_ms))
        except PredictionError:
            self.counts["errors"] += 1
            raise
        self.latency.add(time.monotonic() - started)
        return answer

    async def feedback(
        self, query_id: str, reward: float | None, label: Any, has_label: bool
    ) -> dict[str, Any]:
        raise PredictionError(
            400,
            f"{self.spec.name!r} is a pipeline, which takes no feedback: no policy chooses its "
            "models",
            app=self.spec.name,
        )

    async def _run(self, value: Any, deadline: Deadline) -> dict[str, Any]:
        current = value
        #: The input of the step that produced ``current``, and the models that step ran: a
        #: step run when unsure takes that input, and those models' place.
        producer_input: Any = value
        producer: list[str] = []
        made: list[str] = []
        report = []
        for number, step in enumerate(self.spec.steps, 1):
            counts = self.steps[number - 1]
            if isinstance(step, WhenUnsure):
                confidence = confidence_of(current)
                if confidence is not None and confidence >= step.below:
                    counts.skipped += 1
                    report.append(_step_report(number, step, ran=False, confidence=confidence))
                    continue
                step_input = producer_input
            else:
                step_input = current
            began = time.monotonic()
            try:
                output = await self._step(step, step_input, deadline)
            except PredictionError as exc:
                counts.errors += 1
                raise PredictionError(
                    exc.status,
                    f"pipeline {self.spec.name!r}: step {number} ({_label(step)}) failed: "
                    f"{exc.body['error']}",
                    app=self.spec.name,
                    step=number,
                ) from None
            took = time.monotonic() - began
            counts.runs += 1
            counts.latency.add(took)
            report.append(_step_report(number, step, ran=True, ms=took * 1000))
            if isinstance(step, WhenUnsure):
                made = made[: len(made) - len(producer)]
            else:
                producer_input = step_input
            producer = list(step.models())
            made += producer
            current = output
        return {
            "output": current,
            "query_id": uuid.uuid4().hex,
            "app": self.spec.name,
            "default": False,
            "models": made,
            "confidence": confidence_of(current),
            "steps": report,
        }

    async def _step(self, step: Step, value: Any, deadline: Deadline) -> Any:
        if isinstance(step, Parallel):
            outputs = await asyncio.gather(*(self._ask(m, value, deadline) for m in step.models()))
            return join(step.join, step.models(), outputs)
        return await self._ask(step.model, value, deadline)

    async def _ask(self, reference: str, value: Any, deadline: Deadline) -> Any:
        name, _, version = reference.partition(":")
        queue = self._dispatcher.queue_for(name, version or None)
        outputs = await predict(queue, [value], deadline)
        return plain_value(outputs[0])

    def describe(self) -> dict[str, Any]:
        queries = self.counts["queries"]
        return {
            **self.spec.to_dict(),
            "kind": "pipeline",
            **self.counts,
            "latency_ms": self.latency.describe(),
            "step_counts": [
                {
                    "step": number,
                    "models": list(step.models()),
                    "runs": counts.runs,
                    "skipped": counts.skipped,
                    "errors": counts.errors,
                    # How often a query reaches this step: what its pool is sized by.
                    "share": counts.runs / queries if queries else None,
                    "latency_ms": counts.latency.describe(),
                }
                for number, (step, counts) in enumerate(
                    zip(self.spec.steps, self.steps, strict=True), 1
                )
            ],
        }


def join(how: str, models: Sequence[str], outputs: Sequence[Any]) -> Any:
    """Parallel models' ``outputs`` (in ``models``' order) as one; raises
    :class:`PredictionError` (500) when they cannot be joined so."""
    if how == "list":
        return list(outputs)
    if how == "dict":
        return dict(zip(models, outputs, strict=True))
    if how == "mean":
        try:
            values = np.asarray(outputs, dtype=float)
        except (TypeError, ValueError):
            values = None
        if values is None or values.dtype == object:
            raise PredictionError(
                500,
                f"cannot join the outputs of {list(models)} by their mean: they are not numbers "
                f"or lists of numbers of one shape ({_brief(outputs)})",
            )
        return plain_value(values.mean(axis=0))
    if how == "vote":
        encoded = [orjson.dumps(output, option=orjson.OPT_SORT_KEYS) for output in outputs]
        tally = collections.Counter(encoded)
        best = max(tally.values())
        return next(o for o, e in zip(outputs, encoded, strict=True) if tally[e] == best)
    raise ValueError(f"unknown join {how!r}")


def _step_report(
    number: int,
    step: Step,
    *,
    ran: bool,
    ms: float | None = None,
    confidence: float | None = None,
) -> dict[str, Any]:
    report: dict[str, Any] = {"step": number, "models": list(step.models()), "ran": ran}
    if ms is not None:
        report["ms"] = round(ms, 3)
    if not ran:
        report["skipped_because"] = (
            f"the step before was sure enough (confidence {confidence:g} >= {step.below:g})"
            if isinstance(step, WhenUnsure) and confidence is not None
            else "not needed"
        )
    return report


def _label(step: Step) -> str:
    if isinstance(step, Stage):
        return step.model
    if isinstance(step, WhenUnsure):
        return f"{step.model}, when unsure"
    return f"{', '.join(step.models())} in parallel"


def _brief(outputs: Sequence[Any]) -> str:
    text = orjson.dumps(outputs, default=str).decode()
    return text if len(text) <= 120 else text[:117] + "..."
