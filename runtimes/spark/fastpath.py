"""The JVM-free fast path of the ``spark`` runtime: a saved ``pyspark.ml`` PipelineModel run
as numpy operations.

:data:`BUILDERS` maps each Spark stage class the fast path runs to its numpy implementation
(:mod:`~ketch.runtimes.spark.features`, :mod:`~ketch.runtimes.spark.linear`,
:mod:`~ketch.runtimes.spark.trees`). :func:`convert` builds one stage per pipeline stage
(read with :mod:`~ketch.runtimes.spark.saved`), or raises :class:`PartlyConverted` naming the
first it cannot take. :class:`FastPipeline` checks the request rows (:func:`as_objects`,
:func:`column_values`, which the Spark path uses too) and runs them through the stages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ketch.errors import BatchInputError
from ketch.runtimes.spark.features import (
    IndexToString,
    MaxAbsScaler,
    MinMaxScaler,
    OneHotEncoder,
    StandardScaler,
    StringIndexer,
    VectorAssembler,
)
from ketch.runtimes.spark.linear import LinearRegression, LinearSVC, LogisticRegression
from ketch.runtimes.spark.saved import NoFastPath, StageMeta
from ketch.runtimes.spark.stage import Columns, Kind, Stage
from ketch.runtimes.spark.trees import TreeClassifier, TreeRegressor


@dataclass(frozen=True)
class InputColumn:
    """A column the pipeline reads from the request rather than from an earlier stage."""

    name: str
    kind: Kind
    #: the vector's length (``-1`` when any length goes); 0 for numbers and strings.
    size: int = 0


class PartlyConverted(NoFastPath):
    """:func:`convert`'s :class:`NoFastPath`, with the stages converted before the one it could
    not take (the Spark path checks their inputs as the fast path would)."""

    def __init__(self, reason: str, converted: list[Stage]) -> None:
        super().__init__(reason)
        self.converted = converted


# -- the pipeline -----------------------------------------------------------------------------

_ML = "org.apache.spark.ml."
#: The stage classes the fast path runs, by the class name Spark saves.
BUILDERS: dict[str, Callable[[StageMeta], Stage]] = {
    _ML + "feature.VectorAssembler": VectorAssembler,
    _ML + "feature.StandardScalerModel": StandardScaler,
    _ML + "feature.MinMaxScalerModel": MinMaxScaler,
    _ML + "feature.MaxAbsScalerModel": MaxAbsScaler,
    _ML + "feature.StringIndexerModel": StringIndexer,
    _ML + "feature.OneHotEncoderModel": OneHotEncoder,
    _ML + "feature.IndexToString": IndexToString,
    _ML + "regression.LinearRegressionModel": LinearRegression,
    _ML + "classification.LogisticRegressionModel": LogisticRegression,
    _ML + "classification.LinearSVCModel": LinearSVC,
    _ML + "regression.DecisionTreeRegressionModel": TreeRegressor,
    _ML + "regression.RandomForestRegressionModel": TreeRegressor,
    _ML + "regression.GBTRegressionModel": TreeRegressor,
    _ML + "classification.DecisionTreeClassificationModel": TreeClassifier,
    _ML + "classification.RandomForestClassificationModel": TreeClassifier,
    _ML + "classification.GBTClassificationModel": TreeClassifier,
}


def first_unsupported(stages: Sequence[StageMeta]) -> StageMeta | None:
    """The first stage whose class the fast path does not know (read from metadata only)."""
    return next((s for s in stages if s.class_name not in BUILDERS), None)


class FastPipeline:
    """The converted stages, the columns the request rows must hold, and those it computes."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self.kinds: dict[str, Kind] = {}
        inputs: dict[str, InputColumn] = {}
        for stage in stages:
            for name, kind, size in stage.reads:
                if name in self.kinds:
                    continue
                known = inputs.get(name)
                if known is not None and known.kind != kind:
                    raise NoFastPath(
                        f"column {name!r} is read as a {known.kind} and as a {kind} "
                        f"({stage.meta.label()})"
                    )
                inputs[name] = InputColumn(name, kind, size)
            self.kinds.update(stage.writes)
        self.inputs = tuple(inputs.values())
        self.kinds = {**{c.name: c.kind for c in self.inputs}, **self.kinds}

    def columns(self, rows: Sequence[Any]) -> Columns:
        """The rows' input columns, checked: a missing column or a value of the wrong type is
        a :class:`BatchInputError` naming the column and the input."""
        rows = as_objects(rows, self.inputs)
        return {column.name: column_values(column, rows, self.inputs) for column in self.inputs}

    def run(self, rows: Sequence[Any]) -> Columns:
        columns = self.columns(rows)
        for stage in self.stages:
            stage.transform(columns)
        return columns


def convert(stages: Sequence[StageMeta]) -> FastPipeline:
    """The fast path for these stages, or :class:`PartlyConverted` naming the first it cannot
    take."""
    converted: list[Stage] = []
    for meta in stages:
        builder = BUILDERS.get(meta.class_name)
        try:
            if builder is None:
                raise NoFastPath(f"stage {meta.label()} has no fast path")
            try:
                converted.append(builder(meta))
            except NoFastPath:
                raise
            except (KeyError, IndexError, ValueError, TypeError, OSError) as exc:
                raise NoFastPath(
                    f"stage {meta.label()}: cannot read its saved parameters "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
        except NoFastPath as exc:
            raise PartlyConverted(str(exc), converted) from exc
    return FastPipeline(converted)


# -- the request rows -------------------------------------------------------------------------


def as_objects(rows: Sequence[Any], inputs: Sequence[InputColumn]) -> Sequence[Any]:
    """The rows as objects of columns. A pipeline reading one column also takes its bare value
    (``3.5`` for ``{"x": 3.5}``), as the gateway does for a model of one input."""
    if len(inputs) == 1 and any(not isinstance(row, dict) for row in rows):
        name = inputs[0].name
        rows = [row if isinstance(row, dict) else {name: row} for row in rows]
    for row, item in enumerate(rows):
        if not isinstance(item, dict):
            names = f" ({', '.join(c.name for c in inputs)})" if inputs else ""
            raise BatchInputError(
                f"input {row} must be an object of columns{names}, got {_kind(item)}"
            )
    return rows


def column_values(column: InputColumn, rows: Sequence[Any], inputs: Sequence[InputColumn]) -> Any:
    """``column`` of every row (dicts), as the stages take it; :class:`BatchInputError` naming
    the column and the input when one lacks it or holds a value of the wrong type."""
    name = column.name
    values = []
    for row, item in enumerate(rows):
        try:
            values.append(item[name])
        except KeyError:
            names = ", ".join(c.name for c in inputs)
            raise BatchInputError(
                f"input {row} has no column {name!r} (the pipeline reads: {names})"
            ) from None
    if column.kind == "string":
        for row, value in enumerate(values):
            if value is not None and not isinstance(value, str):
                raise _wrong(name, "a string", value, row)
        return values
    if column.kind == "number":
        for row, value in enumerate(values):
            if value is not None and (type(value) is not float and type(value) is not int):
                raise _wrong(name, "a number", value, row)
        return np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    for row, value in enumerate(values):
        if not (
            isinstance(value, list)
            and (column.size < 0 or len(value) == column.size)
            and all(type(v) is float or type(v) is int for v in value)
        ):
            size = "numbers" if column.size < 0 else f"{column.size} numbers"
            raise _wrong(name, f"a list of {size}", value, row)
    return np.asarray(values, dtype=np.float64).reshape(len(values), -1)


def _wrong(name: str, wanted: str, value: Any, row: int) -> BatchInputError:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return BatchInputError(
        f"column {name!r} must be {wanted}, got {_kind(value)} {shown} in input {row}"
    )


def value_kind(value: Any) -> str:
    """``"number"``, ``"string"``, ``"boolean"``, ``"vector"`` (a list of numbers) or
    ``"other"``: what a JSON value can be in a column."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list) and all(value_kind(v) == "number" for v in value):
        return "vector"
    return "other"


def _kind(value: Any) -> str:
    kinds = {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}
    if value is None:
        return "null"
    return kinds.get(type(value), "a number" if isinstance(value, int | float) else "a value")
