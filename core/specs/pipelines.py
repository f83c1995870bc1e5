"""``ketch.pipeline(...)``: declare models chained into one prediction service.

A pipeline is a list of steps, each fed what the step before it produced:

* a **model** (``"detect"``, or ``"name:version"``): its output is the next step's input;
* **parallel** models (``ketch.parallel("a", "b", join="mean")``): every one gets the same
  input, and their outputs are joined into one: ``"list"`` (in the order given), ``"dict"``
  (by model), ``"mean"`` (of numbers, or element-wise of equal-shaped lists of numbers) or
  ``"vote"`` (the most frequent output, the first given among equals);
* a model **when unsure** (``ketch.when_unsure("big", below=0.8)``): it runs only when the
  step before it is unsure of its output (a confidence below ``below``, or none it can
  tell: see :func:`ketch.policy.confidence_of`), on that step's input, and its output then
  takes that step's place; otherwise that step's output goes on. Several in a row make a
  cascade of ever larger models.

It is served at ``POST /apps/{name}/predict`` like an application, and ``GET /apps`` shows it
with the counts and latencies of each step. Every model keeps its own queue, batching and
pool; one deadline (the request's ``timeout_ms``, else the pipeline's ``slo_ms``, else the
server's request timeout) bounds the whole query, each step getting what the steps before it
left. The declaration is plain data, checked when it is made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgspec

from ketch.specs.models import NAME_PATTERN, plain_data

Join = Literal["list", "dict", "mean", "vote"]
JOINS: tuple[str, ...] = ("list", "dict", "mean", "vote")


class _Step(msgspec.Struct, frozen=True, kw_only=True, tag_field="step"):
    """One step of a pipeline, tagged with its kind in the data."""


class Stage(_Step, frozen=True, tag="model"):
    """A model, fed the step before's output."""

    model: str

    def models(self) -> tuple[str, ...]:
        return (self.model,)


class Parallel(_Step, frozen=True, tag="parallel"):
    """Models fed the same input, their outputs joined."""

    models_: tuple[str, ...] = msgspec.field(name="models")
    join: Join = "list"

    def models(self) -> tuple[str, ...]:
        return self.models_


class WhenUnsure(_Step, frozen=True, tag="when_unsure"):
    """A model that runs only when the step before is unsure, in that step's place."""

    model: str
    below: float

    def models(self) -> tuple[str, ...]:
        return (self.model,)


Step = Stage | Parallel | WhenUnsure


class PipelineSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A pipeline as declared.

    :param name: URL name (``/apps/{name}/predict``), shared with the applications.
    :param steps: what each query goes through, in order (see the module's docstring).
    :param slo_ms: the whole pipeline's deadline; ``None``: the server's request timeout.
    """

    name: str
    steps: tuple[Step, ...]
    slo_ms: float | None = None

    def models(self) -> list[str]:
        """Every model reference the steps name, each once, in order."""
        return list(dict.fromkeys(m for step in self.steps for m in step.models()))

    def to_dict(self) -> dict[str, Any]:
        return plain_data(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineSpec:
        """Rebuild a spec from its plain form, with the checks of ``ketch.pipeline``."""
        # A model's name alone is a model step, as in ketch.pipeline.
        given = [{"step": "model", "model": s} if isinstance(s, str) else s for s in data["steps"]]
        try:
            steps = msgspec.convert(given, tuple[Step, ...])
        except (msgspec.ValidationError, TypeError) as exc:
            raise ValueError(f"steps of pipeline {data.get('name')!r}: {exc}") from None
        return pipeline(data["name"], steps=steps, slo_ms=data.get("slo_ms"))


def parallel(*models: str, join: Join = "list") -> Parallel:
    """A pipeline step that asks ``models`` on the same input and joins their outputs."""
    if len(models) < 2:
        raise ValueError(f"parallel needs two models or more, got {list(models)}")
    for reference in models:
        _check_reference(reference, "parallel")
    if len(set(models)) != len(models):
        raise ValueError(f"parallel lists a model twice: {list(models)}")
    if join not in JOINS:
        raise ValueError(f"join must be one of {list(JOINS)}, got {join!r}")
    return Parallel(models_=tuple(models), join=join)


def when_unsure(model: str, *, below: float) -> WhenUnsure:
    """A pipeline step: ``model`` runs on the previous step's input when that step's output
    has a confidence below ``below`` (or none), and its output replaces that one."""
    _check_reference(model, "when_unsure")
    if (
        isinstance(below, bool)
        or not isinstance(below, int | float)
        or not math.isfinite(below)
        or not 0 < below <= 1
    ):
        raise ValueError(f"below must be a confidence in (0, 1], got {below!r}")
    return WhenUnsure(model=model, below=float(below))


def pipeline(
    name: str, *, steps: Sequence[str | Step], slo_ms: float | None = None
) -> PipelineSpec:
    """Declare a pipeline in the served file: ``captions = ketch.pipeline("captions",
    steps=["detect", "crop", ketch.parallel("a", "b", join="vote")], slo_ms=200)``.

    A step given as a string is a model. Returns the spec; assign it at the module's top
    level, where ``ketch serve`` finds it. Raises ``ValueError``/``TypeError`` naming what is
    wrong.
    """
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(
            f"pipeline name {name!r} is not valid: use 1-128 letters, digits, '_', '.' or '-'"
        )
    if isinstance(steps, str) or not isinstance(steps, Sequence) or not steps:
        raise TypeError(f"steps of pipeline {name!r} must be a non-empty list")
    checked: list[Step] = []
    for number, step in enumerate(steps, 1):
        if isinstance(step, str):
            _check_reference(step, f"step {number} of pipeline {name!r}")
            step = Stage(model=step)
        elif not isinstance(step, Stage | Parallel | WhenUnsure):
            raise TypeError(
                f"step {number} of pipeline {name!r} must be a model's name, ketch.parallel(...) "
                f"or ketch.when_unsure(...), got {step!r}"
            )
        elif isinstance(step, Parallel):
            parallel(*step.models_, join=step.join)  # the same checks, from data too
        else:
            _check_reference(step.model, f"step {number} of pipeline {name!r}")
            if isinstance(step, WhenUnsure):
                when_unsure(step.model, below=step.below)
        if isinstance(step, WhenUnsure) and number == 1:
            raise ValueError(
                f"step 1 of pipeline {name!r} is when_unsure({step.model!r}): it needs a step "
                "before it, whose confidence it follows"
            )
        checked.append(step)
    if slo_ms is not None and (
        isinstance(slo_ms, bool)
        or not isinstance(slo_ms, int | float)
        or not math.isfinite(slo_ms)
        or slo_ms <= 0
    ):
        raise ValueError(f"slo_ms of pipeline {name!r} must be a number > 0, got {slo_ms!r}")
    return PipelineSpec(
        name=name, steps=tuple(checked), slo_ms=float(slo_ms) if slo_ms is not None else None
    )


def _check_reference(reference: Any, where: str) -> None:
    name, colon, version = reference.partition(":") if isinstance(reference, str) else ("", "", "")
    if not NAME_PATTERN.match(name) or (colon and not NAME_PATTERN.match(version)):
        raise ValueError(f"{where} names {reference!r}: name a model as 'name' or 'name:version'")
