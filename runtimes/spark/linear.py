"""The linear models of the ``spark`` runtime's fast path: LinearRegression,
LogisticRegression (binary and multinomial) and LinearSVC."""

from __future__ import annotations

import math

import numpy as np

from ketch.runtimes.spark.saved import StageMeta, read_matrix, read_table, read_vector
from ketch.runtimes.spark.stage import Classifier, Columns, Predictor, as_floats


class LinearRegression(Predictor):
    def __init__(self, meta: StageMeta) -> None:
        data = read_table(meta.folder / "data")
        self.coefficients = read_vector(data, "coefficients")
        self.intercept = float(data["intercept"][0])
        super().__init__(meta, len(self.coefficients))

    def transform(self, columns: Columns) -> None:
        if self.prediction:
            columns[self.prediction] = self.vectors(columns) @ self.coefficients + self.intercept


class LogisticRegression(Classifier):
    def __init__(self, meta: StageMeta) -> None:
        data = read_table(meta.folder / "data")
        if "coefficientMatrix.values" in data:
            weights = read_matrix(data, "coefficientMatrix")
            self.intercepts = read_vector(data, "interceptVector")
            self.multinomial = bool(data["isMultinomial"][0])
            classes = int(data["numClasses"][0])
        else:  # Spark < 2.1: one binary model
            weights = read_vector(data, "coefficients")[None, :]
            self.intercepts = np.asarray([float(data["intercept"][0])])
            self.multinomial, classes = False, 2
        self.weights = weights
        super().__init__(meta, weights.shape[1], classes)
        threshold = float(self.param("threshold", 0.5))
        if self.thresholds is not None and not self.multinomial:
            # Spark's binary model turns thresholds into one threshold.
            t0, t1 = self.thresholds
            threshold = 1.0 / (1.0 + t0 / t1) if t1 != 0 else 0.0
            self.thresholds = None
        self.threshold = threshold
        self.raw_threshold = (
            -math.inf
            if threshold == 0.0
            else math.inf
            if threshold == 1.0
            else math.log(threshold / (1.0 - threshold))
        )

    def raw(self, features: np.ndarray) -> np.ndarray:
        margins = features @ self.weights.T + self.intercepts
        if self.multinomial:
            return as_floats(margins)
        return np.hstack([-margins, margins])

    def probability(self, raw: np.ndarray) -> np.ndarray:
        if not self.multinomial:
            # A large margin overflows exp to inf and the probability to 0, as in Spark.
            with np.errstate(over="ignore"):
                return as_floats(1.0 / (1.0 + np.exp(-raw)))
        top = raw.max(axis=1, keepdims=True)
        # Spark subtracts the largest margin only when it is positive (against overflow).
        exps = np.exp(np.where(top > 0, raw - top, raw))
        return as_floats(exps * (1.0 / exps.sum(axis=1, keepdims=True)))

    def raw_to_prediction(self, raw: np.ndarray) -> np.ndarray:
        if self.multinomial:
            return super().raw_to_prediction(raw)
        return (raw[:, 1] > self.raw_threshold).astype(np.float64)

    def probability_to_prediction(self, probability: np.ndarray) -> np.ndarray:
        if self.multinomial:
            return super().probability_to_prediction(probability)
        return (probability[:, 1] > self.threshold).astype(np.float64)


class LinearSVC(Classifier):
    probabilistic = False

    def __init__(self, meta: StageMeta) -> None:
        data = read_table(meta.folder / "data")
        self.coefficients = read_vector(data, "coefficients")
        self.intercept = float(data["intercept"][0])
        super().__init__(meta, len(self.coefficients), 2)
        self.threshold = float(self.param("threshold", 0.0))

    def raw(self, features: np.ndarray) -> np.ndarray:
        margin = (features @ self.coefficients + self.intercept)[:, None]
        return np.hstack([-margin, margin])

    def raw_to_prediction(self, raw: np.ndarray) -> np.ndarray:
        return (raw[:, 1] > self.threshold).astype(np.float64)
