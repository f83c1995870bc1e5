"""The feature transformers of the ``spark`` runtime's fast path: VectorAssembler, the
scalers, StringIndexer, OneHotEncoder and IndexToString, as numpy operations."""

from __future__ import annotations

import math

import numpy as np

from ketch.runtimes.spark.saved import NoFastPath, StageMeta, read_table, read_vector
from ketch.runtimes.spark.stage import Columns, Stage


class VectorAssembler(Stage):
    def __init__(self, meta: StageMeta) -> None:
        super().__init__(meta)
        self.inputs = [str(c) for c in self.param("inputCols")]
        self.output = str(self.param("outputCol"))
        self.handle_invalid = self.param("handleInvalid", "error")
        # A raw input column is a number; a column made by an earlier stage may be a vector.
        self.reads = [(c, "number", 0) for c in self.inputs]
        self.writes = {self.output: "vector"}

    def transform(self, columns: Columns) -> None:
        parts = []
        for name in self.inputs:
            column = columns[name]
            if column.ndim == 1:
                # Spark refuses null and NaN numbers unless handleInvalid="keep" ("skip" drops
                # the row, which a prediction service cannot do either).
                if self.handle_invalid != "keep" and np.isnan(column).any():
                    row = int(np.flatnonzero(np.isnan(column))[0])
                    raise self.fail(
                        f"column {name!r} is null or NaN in input {row}, which the pipeline "
                        f"refuses (handleInvalid={self.handle_invalid!r})"
                    )
                column = column[:, None]
            parts.append(column)
        columns[self.output] = np.hstack(parts) if len(parts) > 1 else parts[0].copy()


class _VectorMap(Stage):
    """A stage mapping one vector column to another of the same size."""

    def __init__(self, meta: StageMeta, size: int) -> None:
        super().__init__(meta)
        self.input = str(self.param("inputCol"))
        self.output = str(self.param("outputCol"))
        self.size = size
        self.reads = [(self.input, "vector", size)]
        self.writes = {self.output: "vector"}

    def vectors(self, columns: Columns) -> np.ndarray:
        array: np.ndarray = columns[self.input]
        if array.ndim != 2 or array.shape[1] != self.size:
            raise self.fail(f"column {self.input!r} must hold vectors of {self.size} numbers")
        return array


class StandardScaler(_VectorMap):
    def __init__(self, meta: StageMeta) -> None:
        data = read_table(meta.folder / "data")
        self.mean, std = read_vector(data, "mean"), read_vector(data, "std")
        super().__init__(meta, len(std))
        self.with_mean = bool(self.param("withMean", False))
        self.with_std = bool(self.param("withStd", True))
        # Spark multiplies by 1/std, and by 0 where std is 0 (a constant feature).
        with np.errstate(divide="ignore"):
            self.scale = np.where(std != 0.0, 1.0 / std, 0.0)

    def transform(self, columns: Columns) -> None:
        values = self.vectors(columns)
        if self.with_mean:
            values = values - self.mean
        if self.with_std:
            values = values * self.scale
        columns[self.output] = values if (self.with_mean or self.with_std) else values.copy()


class MinMaxScaler(_VectorMap):
    def __init__(self, meta: StageMeta) -> None:
        data = read_table(meta.folder / "data")
        self.low = read_vector(data, "originalMin")
        high = read_vector(data, "originalMax")
        super().__init__(meta, len(high))
        self.min = float(self.param("min", 0.0))
        self.range = float(self.param("max", 1.0)) - self.min
        spread = high - self.low
        with np.errstate(divide="ignore", invalid="ignore"):
            self.scale = np.where(spread != 0.0, self.range / spread, 0.0)

    def transform(self, columns: Columns) -> None:
        values = self.vectors(columns)
        scaled = (values - self.low) * self.scale + self.min
        # A constant feature maps to the middle of the range; NaN stays NaN.
        scaled = np.where(self.scale != 0.0, scaled, 0.5 * self.range + self.min)
        columns[self.output] = np.where(np.isnan(values), values, scaled)


class MaxAbsScaler(_VectorMap):
    def __init__(self, meta: StageMeta) -> None:
        peak = read_vector(read_table(meta.folder / "data"), "maxAbs")
        super().__init__(meta, len(peak))
        with np.errstate(divide="ignore"):
            self.scale = np.where(peak != 0.0, 1.0 / peak, 1.0)

    def transform(self, columns: Columns) -> None:
        columns[self.output] = self.vectors(columns) * self.scale


class StringIndexer(Stage):
    def __init__(self, meta: StageMeta) -> None:
        super().__init__(meta)
        data = read_table(meta.folder / "data")
        # Spark 3 saves labelsArray (one list per input column); Spark 2, labels.
        labels = data["labelsArray"][0] if "labelsArray" in data else [data["labels"][0]]
        self.pairs = self.column_pairs()
        if len(labels) != len(self.pairs):
            raise ValueError(f"{len(labels)} label lists for {len(self.pairs)} columns")
        self.indexes = [{label: float(i) for i, label in enumerate(ls)} for ls in labels]
        self.handle_invalid = self.param("handleInvalid", "error")
        self.reads = [(i, "string", 0) for i, _ in self.pairs]
        self.writes = {o: "number" for _, o in self.pairs}

    def transform(self, columns: Columns) -> None:
        keep = self.handle_invalid == "keep"
        for (name, output), index in zip(self.pairs, self.indexes, strict=True):
            unseen = float(len(index))
            out = np.empty(len(columns[name]))
            for row, value in enumerate(columns[name]):
                found = index.get(value) if value is not None else None
                if found is None:
                    if not keep:
                        what = "null" if value is None else f"the unseen label {value!r}"
                        raise self.fail(
                            f"column {name!r} holds {what} in input {row}, which the pipeline "
                            f"refuses (handleInvalid={self.handle_invalid!r}; known labels: "
                            f"{', '.join(map(repr, list(index)[:10]))})"
                        )
                    found = unseen
                out[row] = found
            columns[output] = out


class OneHotEncoder(Stage):
    def __init__(self, meta: StageMeta) -> None:
        super().__init__(meta)
        sizes = [int(s) for s in read_table(meta.folder / "data")["categorySizes"][0]]
        self.pairs = self.column_pairs()
        if len(sizes) != len(self.pairs):
            raise ValueError(f"{len(sizes)} category sizes for {len(self.pairs)} columns")
        self.keep = self.param("handleInvalid", "error") == "keep"
        drop_last = bool(self.param("dropLast", True))
        self.sizes = sizes
        # Spark's configured sizes: "keep" adds a slot for invalid values, dropLast removes one.
        self.widths = [s + int(self.keep) - int(drop_last) for s in sizes]
        self.reads = [(i, "number", 0) for i, _ in self.pairs]
        self.writes = {o: "vector" for _, o in self.pairs}

    def transform(self, columns: Columns) -> None:
        for (name, output), size, width in zip(self.pairs, self.sizes, self.widths, strict=True):
            labels: np.ndarray = columns[name]
            valid = (labels >= 0) & (labels < size)
            if not self.keep and not valid.all():
                row = int(np.flatnonzero(~valid)[0])
                raise self.fail(
                    f"column {name!r} holds {labels[row]!r} in input {row}, not a category "
                    f"index in [0, {size}) (handleInvalid='error')"
                )
            slot = np.where(valid, labels, size).astype(np.intp)
            out = np.zeros((len(labels), width))
            hit = slot < width  # the dropped last category encodes as all zeros
            out[np.flatnonzero(hit), slot[hit]] = 1.0
            columns[output] = out


class IndexToString(Stage):
    def __init__(self, meta: StageMeta) -> None:
        super().__init__(meta)
        labels = self.param("labels")
        if not labels:
            # Without labels Spark reads them from the input column's ML attributes.
            raise NoFastPath(f"stage {meta.label()} takes its labels from column metadata")
        self.labels = [str(label) for label in labels]
        self.input = str(self.param("inputCol"))
        self.output = str(self.param("outputCol"))
        self.reads = [(self.input, "number", 0)]
        self.writes = {self.output: "string"}

    def transform(self, columns: Columns) -> None:
        out = []
        for row, value in enumerate(columns[self.input].tolist()):
            index = int(value) if math.isfinite(value) else -1
            if not 0 <= index < len(self.labels):
                raise self.fail(f"column {self.input!r} holds the unseen index {value} (row {row})")
            out.append(self.labels[index])
        columns[self.output] = out
