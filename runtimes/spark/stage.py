"""What every stage of the ``spark`` runtime's fast path shares: the batch as columns, the
:class:`Stage` base class, and the bases of fitted models (:class:`Predictor`, and
:class:`Classifier` for Spark's rawPrediction / probability / prediction columns).

A batch goes through the stages as a dict of columns, one entry per column with all the
batch's rows: a number column is a float64 array ``(n,)``, a vector column a float64 array
``(n, size)``, a string column a list of ``str | None``. Each stage computes what Spark's
``transform`` computes, in the same order of operations where the order changes the result
(scaling, tie-breaking between classes), so answers match Spark's to rounding.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeAlias

import numpy as np

from ketch.errors import BatchInputError
from ketch.runtimes.spark.saved import StageMeta

#: What a column holds: numbers (``(n,)`` float64), vectors (``(n, size)``), or strings.
Kind: TypeAlias = Literal["number", "vector", "string"]
Columns: TypeAlias = dict[str, Any]


class Stage:
    """One pipeline stage on the fast path."""

    def __init__(self, meta: StageMeta) -> None:
        self.meta = meta
        #: ``(column, kind, vector size or -1)`` this stage reads.
        self.reads: list[tuple[str, Kind, int]] = []
        #: The columns it adds, with their kinds.
        self.writes: dict[str, Kind] = {}

    def param(self, name: str, default: Any = None) -> Any:
        return self.meta.params.get(name, default)

    def column_pairs(self) -> list[tuple[str, str]]:
        """``(input, output)`` for ``inputCol(s)``/``outputCol(s)`` stages."""
        if "inputCols" in self.meta.params:
            inputs, outputs = self.param("inputCols"), self.param("outputCols")
            if not isinstance(outputs, list) or len(outputs) != len(inputs):
                raise ValueError("inputCols and outputCols differ in length")
            return [(str(i), str(o)) for i, o in zip(inputs, outputs, strict=True)]
        return [(str(self.param("inputCol")), str(self.param("outputCol")))]

    def transform(self, columns: Columns) -> None:
        raise NotImplementedError

    def fail(self, message: str) -> BatchInputError:
        return BatchInputError(f"{message} ({self.meta.label()})")


class Predictor(Stage):
    """A fitted model reading ``featuresCol`` and writing ``predictionCol``."""

    def __init__(self, meta: StageMeta, num_features: int) -> None:
        super().__init__(meta)
        self.features = str(self.param("featuresCol", "features"))
        self.prediction = str(self.param("predictionCol", "prediction"))
        self.num_features = num_features
        self.reads = [(self.features, "vector", num_features)]
        if self.prediction:
            self.writes[self.prediction] = "number"

    def vectors(self, columns: Columns) -> np.ndarray:
        array: np.ndarray = columns[self.features]
        if array.ndim != 2 or array.shape[1] != self.num_features:
            raise self.fail(
                f"column {self.features!r} must hold vectors of {self.num_features} numbers"
            )
        return array


class Classifier(Predictor):
    """Spark's ProbabilisticClassificationModel: rawPrediction, then probability from it, and
    the prediction from rawPrediction when that column is kept (else from probability)."""

    probabilistic: ClassVar[bool] = True

    def __init__(self, meta: StageMeta, num_features: int, num_classes: int) -> None:
        super().__init__(meta, num_features)
        self.num_classes = num_classes
        self.raw_column = str(self.param("rawPredictionCol", "rawPrediction"))
        self.probability_column = (
            str(self.param("probabilityCol", "probability")) if self.probabilistic else ""
        )
        thresholds = self.param("thresholds")
        self.thresholds = None if thresholds is None else np.asarray(thresholds, dtype=float)
        for column in (self.raw_column, self.probability_column):
            if column:
                self.writes[column] = "vector"

    def raw(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def probability(self, raw: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def raw_to_prediction(self, raw: np.ndarray) -> np.ndarray:
        if self.thresholds is None:
            return as_floats(raw.argmax(axis=1))
        return self.probability_to_prediction(self.probability(raw))

    def probability_to_prediction(self, probability: np.ndarray) -> np.ndarray:
        if self.thresholds is None:
            return as_floats(probability.argmax(axis=1))
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = probability / self.thresholds
        # Spark's loop keeps the first strictly greater value, so NaN (0/0) never wins.
        return as_floats(np.where(np.isnan(scaled), -np.inf, scaled).argmax(axis=1))

    def transform(self, columns: Columns) -> None:
        raw = self.raw(self.vectors(columns))
        probability = self.probability(raw) if self.probabilistic else None
        if self.raw_column:
            columns[self.raw_column] = raw
        if probability is not None and self.probability_column:
            columns[self.probability_column] = probability
        if self.prediction:
            if self.raw_column or probability is None:
                columns[self.prediction] = self.raw_to_prediction(raw)
            else:
                columns[self.prediction] = self.probability_to_prediction(probability)


def as_floats(values: Any) -> np.ndarray:
    """``values`` as a float64 array (the dtype of Spark's prediction columns)."""
    return np.asarray(values, dtype=np.float64)
