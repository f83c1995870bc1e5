"""The JVM-free fast path of the ``spark`` runtime: a saved ``pyspark.ml`` PipelineModel read
from its files and run as numpy operations.

A saved PipelineModel is a folder::

    metadata/part-00000            JSON: class, uid, paramMap, defaultParamMap, sparkVersion
    stages/NN_UID/metadata/...     each stage's JSON, likewise
    stages/NN_UID/data/*.parquet   a fitted stage's parameters (vectors, matrices, tree nodes)
    stages/NN_UID/treesMetadata/   tree ensembles: one row per tree, with its weight

:func:`read_pipeline` needs only the standard library, so the runtime's ``check`` can use it
where the model is declared. :func:`convert` reads the parquet files with pyarrow (imported
there, in the worker) and builds one :class:`Stage` per pipeline stage, or raises
:class:`NoFastPath` naming the first stage it cannot take.

A batch goes through the stages as a dict of columns, one entry per column with all the
batch's rows: a number column is a float64 array ``(n,)``, a vector column a float64 array
``(n, size)``, a string column a list of ``str | None``. Each stage computes what Spark's
``transform`` computes, in the same order of operations where the order changes the result
(scaling, tie-breaking between classes), so answers match Spark's to rounding.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeAlias

import numpy as np

from ketch.errors import BatchInputError

PIPELINE_CLASS = "org.apache.spark.ml.PipelineModel"

#: What a column holds: numbers (``(n,)`` float64), vectors (``(n, size)``), or strings.
Kind: TypeAlias = Literal["number", "vector", "string"]
Columns: TypeAlias = dict[str, Any]


#: Models whose estimator's name ends in Classifier / Regressor rather than in the model's.
_ESTIMATOR_SUFFIXED = ("DecisionTree", "RandomForest", "GBT", "FM", "MultilayerPerceptron")


class NoFastPath(Exception):
    """A stage the fast path cannot run; the message names the stage and why."""

    #: The stages converted before the one that could not be (set by :func:`convert`).
    converted: list[Stage] = []  # noqa: RUF012 (replaced per instance, never mutated)


@dataclass(frozen=True)
class StageMeta:
    """One saved stage: its class, uid, parameters (defaults overlaid by the set ones), and
    the folder holding its ``data/``."""

    class_name: str
    uid: str
    params: dict[str, Any]
    folder: Path

    @property
    def name(self) -> str:
        """The estimator's name: ``StringIndexer``, ``RandomForestClassifier``."""
        return short_name(self.class_name)

    def label(self) -> str:
        return f"{self.name} (uid {self.uid})"


def short_name(class_name: str) -> str:
    """``org.apache.spark.ml.feature.StringIndexerModel`` as users know it: ``StringIndexer``."""
    short = class_name.rsplit(".", 1)[-1]
    # Tree models are DecisionTreeClassificationModel for a DecisionTreeClassifier, while
    # LogisticRegressionModel comes from LogisticRegression: name the estimator.
    for suffix, estimator in (
        ("ClassificationModel", "Classifier"),
        ("RegressionModel", "Regressor"),
    ):
        base = short.removesuffix(suffix)
        if base != short and base in _ESTIMATOR_SUFFIXED:
            return base + estimator
    return short.removesuffix("Model")


@dataclass(frozen=True)
class InputColumn:
    """A column the pipeline reads from the request rather than from an earlier stage."""

    name: str
    kind: Kind
    #: the vector's length (``-1`` when any length goes); 0 for numbers and strings.
    size: int = 0


# -- reading the saved files ------------------------------------------------------------------


def read_json_metadata(folder: Path) -> dict[str, Any]:
    """The JSON in ``folder/metadata/part-*`` (one line, written by Spark's DefaultParamsWriter)."""
    meta = folder / "metadata"
    parts = sorted(p for p in meta.glob("part-*") if p.is_file()) if meta.is_dir() else []
    if not parts:
        raise ValueError(f"{str(folder)!r} has no metadata/part-* file")
    try:
        data = json.loads(parts[0].read_text().splitlines()[0])
    except (OSError, IndexError, ValueError) as exc:
        raise ValueError(f"cannot read {str(parts[0])!r}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("class"), str):
        raise ValueError(f"{str(parts[0])!r} is not Spark ML metadata (no 'class')")
    return data


def read_pipeline(path: Path) -> list[StageMeta]:
    """The stages of the PipelineModel saved at ``path``, in order (nested pipelines flattened).

    Raises ``ValueError`` naming the path when it is not a saved PipelineModel.
    """
    where = repr(str(path))
    if not path.is_dir():
        raise ValueError(f"{where} is not a folder: give the folder a PipelineModel was saved to")
    missing = [name for name in ("metadata", "stages") if not (path / name).is_dir()]
    if "metadata" in missing:
        raise ValueError(
            f"{where} is not a saved Spark PipelineModel: it has no metadata/ folder "
            "(save with pipeline_model.write().save(path))"
        )
    meta = read_json_metadata(path)
    if meta["class"] != PIPELINE_CLASS:
        raise ValueError(
            f"{where} holds a saved {meta['class']}, not a PipelineModel: save the fitted "
            "Pipeline (Pipeline(stages=[...]).fit(df).write().save(path))"
        )
    if missing:
        raise ValueError(f"{where} is not a saved Spark PipelineModel: it has no stages/ folder")
    uids = meta.get("paramMap", {}).get("stageUids")
    if not isinstance(uids, list):
        raise ValueError(f"{where}: its metadata lists no stageUids")
    stages: list[StageMeta] = []
    for index, uid in enumerate(uids):
        folder = _stage_folder(path / "stages", index, str(uid))
        data = read_json_metadata(folder)
        if data["class"] == PIPELINE_CLASS:
            stages.extend(read_pipeline(folder))
            continue
        params = {**data.get("defaultParamMap", {}), **data.get("paramMap", {})}
        stages.append(StageMeta(data["class"], str(data.get("uid", uid)), params, folder))
    return stages


def _stage_folder(stages: Path, index: int, uid: str) -> Path:
    # Spark names them NN_UID, NN zero-padded to as many digits as the stage count has.
    for folder in stages.iterdir():
        prefix, _, rest = folder.name.partition("_")
        if rest == uid and prefix.isdigit() and int(prefix) == index:
            return folder
    raise ValueError(f"{str(stages)!r} has no folder for stage {index} ({uid})")


def _read_table(folder: Path) -> dict[str, list[Any]]:
    """The parquet files in ``folder`` as columns, struct fields flattened to ``a.b``."""
    try:
        pq = importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise NoFastPath("pyarrow is not installed (pip install 'ketch[spark]')") from None
    table = pq.read_table(str(folder))
    while any(str(field.type).startswith("struct<") for field in table.schema):
        table = table.flatten()
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _vector(data: Mapping[str, list[Any]], name: str, row: int = 0) -> np.ndarray:
    """A saved ``VectorUDT`` (type 0 sparse: size, indices, values; type 1 dense: values)."""
    values = np.asarray(data[f"{name}.values"][row], dtype=np.float64)
    kind = data[f"{name}.type"][row]
    if kind == 1:
        return values
    if kind == 0:
        dense = np.zeros(int(data[f"{name}.size"][row]))
        dense[np.asarray(data[f"{name}.indices"][row], dtype=np.intp)] = values
        return dense
    raise ValueError(f"vector {name!r} has unknown type {kind!r}")


def _matrix(data: Mapping[str, list[Any]], name: str, row: int = 0) -> np.ndarray:
    """A saved ``MatrixUDT``: dense (type 1) or compressed sparse (type 0), column-major
    unless ``isTransposed``."""
    rows, cols = int(data[f"{name}.numRows"][row]), int(data[f"{name}.numCols"][row])
    values = np.asarray(data[f"{name}.values"][row], dtype=np.float64)
    transposed = bool(data[f"{name}.isTransposed"][row])
    kind = data[f"{name}.type"][row]
    if kind == 1:
        return values.reshape(rows, cols) if transposed else values.reshape(cols, rows).T
    if kind != 0:
        raise ValueError(f"matrix {name!r} has unknown type {kind!r}")
    # CSC; transposed, the same arrays describe the rows (CSR).
    pointers = data[f"{name}.colPtrs"][row]
    indices = data[f"{name}.rowIndices"][row]
    dense = np.zeros((rows, cols))
    for major in range(len(pointers) - 1):
        for k in range(pointers[major], pointers[major + 1]):
            if transposed:
                dense[major, indices[k]] = values[k]
            else:
                dense[indices[k], major] = values[k]
    return dense


# -- stages -----------------------------------------------------------------------------------


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
        data = _read_table(meta.folder / "data")
        self.mean, std = _vector(data, "mean"), _vector(data, "std")
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
        data = _read_table(meta.folder / "data")
        self.low = _vector(data, "originalMin")
        high = _vector(data, "originalMax")
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
        peak = _vector(_read_table(meta.folder / "data"), "maxAbs")
        super().__init__(meta, len(peak))
        with np.errstate(divide="ignore"):
            self.scale = np.where(peak != 0.0, 1.0 / peak, 1.0)

    def transform(self, columns: Columns) -> None:
        columns[self.output] = self.vectors(columns) * self.scale


class StringIndexer(Stage):
    def __init__(self, meta: StageMeta) -> None:
        super().__init__(meta)
        data = _read_table(meta.folder / "data")
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
        sizes = [int(s) for s in _read_table(meta.folder / "data")["categorySizes"][0]]
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


class _Predictor(Stage):
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


class _Classifier(_Predictor):
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
            return _floats(raw.argmax(axis=1))
        return self.probability_to_prediction(self.probability(raw))

    def probability_to_prediction(self, probability: np.ndarray) -> np.ndarray:
        if self.thresholds is None:
            return _floats(probability.argmax(axis=1))
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = probability / self.thresholds
        # Spark's loop keeps the first strictly greater value, so NaN (0/0) never wins.
        return _floats(np.where(np.isnan(scaled), -np.inf, scaled).argmax(axis=1))

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


class LinearRegression(_Predictor):
    def __init__(self, meta: StageMeta) -> None:
        data = _read_table(meta.folder / "data")
        self.coefficients = _vector(data, "coefficients")
        self.intercept = float(data["intercept"][0])
        super().__init__(meta, len(self.coefficients))

    def transform(self, columns: Columns) -> None:
        if self.prediction:
            columns[self.prediction] = self.vectors(columns) @ self.coefficients + self.intercept


class LogisticRegression(_Classifier):
    def __init__(self, meta: StageMeta) -> None:
        data = _read_table(meta.folder / "data")
        if "coefficientMatrix.values" in data:
            weights = _matrix(data, "coefficientMatrix")
            self.intercepts = _vector(data, "interceptVector")
            self.multinomial = bool(data["isMultinomial"][0])
            classes = int(data["numClasses"][0])
        else:  # Spark < 2.1: one binary model
            weights = _vector(data, "coefficients")[None, :]
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
            return _floats(margins)
        return np.hstack([-margins, margins])

    def probability(self, raw: np.ndarray) -> np.ndarray:
        if not self.multinomial:
            # A large margin overflows exp to inf and the probability to 0, as in Spark.
            with np.errstate(over="ignore"):
                return _floats(1.0 / (1.0 + np.exp(-raw)))
        top = raw.max(axis=1, keepdims=True)
        # Spark subtracts the largest margin only when it is positive (against overflow).
        exps = np.exp(np.where(top > 0, raw - top, raw))
        return _floats(exps * (1.0 / exps.sum(axis=1, keepdims=True)))

    def raw_to_prediction(self, raw: np.ndarray) -> np.ndarray:
        if self.multinomial:
            return super().raw_to_prediction(raw)
        return (raw[:, 1] > self.raw_threshold).astype(np.float64)

    def probability_to_prediction(self, probability: np.ndarray) -> np.ndarray:
        if self.multinomial:
            return super().probability_to_prediction(probability)
        return (probability[:, 1] > self.threshold).astype(np.float64)


class LinearSVC(_Classifier):
    probabilistic = False

    def __init__(self, meta: StageMeta) -> None:
        data = _read_table(meta.folder / "data")
        self.coefficients = _vector(data, "coefficients")
        self.intercept = float(data["intercept"][0])
        super().__init__(meta, len(self.coefficients), 2)
        self.threshold = float(self.param("threshold", 0.0))

    def raw(self, features: np.ndarray) -> np.ndarray:
        margin = (features @ self.coefficients + self.intercept)[:, None]
        return np.hstack([-margin, margin])

    def raw_to_prediction(self, raw: np.ndarray) -> np.ndarray:
        return (raw[:, 1] > self.threshold).astype(np.float64)


# -- trees ------------------------------------------------------------------------------------


class Forest:
    """The trees of a model as flat node arrays, walked for all rows and trees at once.

    Leaves point to themselves, so walking every row ``depth`` steps lands each on its leaf
    whatever the depth of its path.
    """

    def __init__(self, data: Mapping[str, list[Any]], tree_ids: Sequence[int]) -> None:
        node_ids = data["id"]
        order = sorted(range(len(node_ids)), key=lambda i: (tree_ids[i], node_ids[i]))
        place = {(tree_ids[i], node_ids[i]): at for at, i in enumerate(order)}
        count = len(order)
        self.feature = np.zeros(count, dtype=np.intp)
        self.threshold = np.full(count, np.inf)
        self.left = np.arange(count)
        self.right = np.arange(count)
        self.categorical = np.zeros(count, dtype=bool)
        self.category_row = np.zeros(count, dtype=np.intp)
        self.prediction = np.asarray([data["prediction"][i] for i in order], dtype=np.float64)
        self.stats = [data["impurityStats"][i] for i in order]
        categories: list[list[float]] = [[]]
        for at, i in enumerate(order):
            tree = tree_ids[i]
            if data["leftChild"][i] < 0:
                continue
            self.left[at] = place[(tree, data["leftChild"][i])]
            self.right[at] = place[(tree, data["rightChild"][i])]
            self.feature[at] = data["split.featureIndex"][i]
            split = data["split.leftCategoriesOrThreshold"][i]
            if data["split.numCategories"][i] == -1:
                self.threshold[at] = split[0]
            else:  # goes left when the value is one of these categories
                self.categorical[at] = True
                self.category_row[at] = len(categories)
                categories.append(split)
        width = int(max((max(c, default=0) for c in categories), default=0)) + 1
        self.left_categories = np.zeros((len(categories), width), dtype=bool)
        for row, values in enumerate(categories):
            self.left_categories[row, np.asarray(values, dtype=np.intp)] = True
        self.roots = np.asarray([place[(tree, 0)] for tree in sorted(set(tree_ids))], dtype=np.intp)
        self.depth = self._depth()
        self.num_features = int(self.feature.max()) + 1 if count else 0

    def _depth(self) -> int:
        depth, level = 0, self.roots
        while True:
            inner = level[self.left[level] != level]
            if not len(inner):
                return depth
            depth += 1
            level = np.concatenate([self.left[inner], self.right[inner]])

    def leaves(self, features: np.ndarray) -> np.ndarray:
        """``(rows, trees)``: the leaf each row reaches in each tree."""
        nodes = np.tile(self.roots, (len(features), 1))
        rows = np.arange(len(features))[:, None]
        has_categorical = bool(self.categorical.any())
        width = self.left_categories.shape[1]
        for _ in range(self.depth):
            values = features[rows, self.feature[nodes]]
            left = values <= self.threshold[nodes]  # NaN goes right, as in Spark
            if has_categorical:
                whole = np.isfinite(values) & (values >= 0) & (values < width)
                whole &= values == np.floor(np.where(whole, values, 0.0))
                index = np.where(whole, values, 0.0).astype(np.intp)
                member = whole & self.left_categories[self.category_row[nodes], index]
                left = np.where(self.categorical[nodes], member, left)
            nodes = np.where(left, self.left[nodes], self.right[nodes])
        result: np.ndarray = nodes
        return result


def _forest(meta: StageMeta) -> tuple[Forest, np.ndarray]:
    """The model's trees and their weights (1.0 each for a single tree)."""
    data = _read_table(meta.folder / "data")
    if "treeID" in data:
        nodes = {key.removeprefix("nodeData."): value for key, value in data.items()}
        forest = Forest(nodes, data["treeID"])
        trees = _read_table(meta.folder / "treesMetadata")
        order = sorted(range(len(trees["_1"])), key=lambda i: trees["_1"][i])
        weights = np.asarray([trees["_3"][i] for i in order], dtype=np.float64)
    else:
        forest = Forest(data, [0] * len(data["id"]))
        weights = np.ones(1)
    if len(weights) != len(forest.roots):
        raise ValueError(f"{len(weights)} tree weights for {len(forest.roots)} trees")
    return forest, weights


def _num_features(meta: StageMeta, forest: Forest) -> int:
    return int(_metadata_extra(meta, "numFeatures", forest.num_features))


def _metadata_extra(meta: StageMeta, key: str, default: Any) -> Any:
    # Tree models keep numFeatures / numClasses beside the params in their metadata JSON.
    return read_json_metadata(meta.folder).get(key, default)


class TreeRegressor(_Predictor):
    """DecisionTreeRegressionModel, RandomForestRegressionModel, GBTRegressionModel."""

    def __init__(self, meta: StageMeta) -> None:
        self.forest, self.weights = _forest(meta)
        self.ensemble = meta.name.removesuffix("Regressor")
        super().__init__(meta, _num_features(meta, self.forest))

    def transform(self, columns: Columns) -> None:
        leaves = self.forest.leaves(self.vectors(columns))
        predictions = self.forest.prediction[leaves]
        if self.prediction:
            columns[self.prediction] = _combine(self.ensemble, predictions, self.weights)


def _combine(ensemble: str, predictions: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The trees' predictions ``(rows, trees)`` summed tree by tree, in Spark's order."""
    total = np.zeros(len(predictions))
    if ensemble == "GBT":
        for tree in range(predictions.shape[1]):
            total += predictions[:, tree] * weights[tree]
        return total
    for tree in range(predictions.shape[1]):
        total += predictions[:, tree]
    return total / predictions.shape[1] if ensemble == "RandomForest" else total


class TreeClassifier(_Classifier):
    """DecisionTreeClassificationModel, RandomForestClassificationModel, GBTClassificationModel
    (binary; its trees are regression trees)."""

    def __init__(self, meta: StageMeta) -> None:
        self.forest, self.weights = _forest(meta)
        self.ensemble = meta.name.removesuffix("Classifier")
        classes = 2 if self.ensemble == "GBT" else int(_metadata_extra(meta, "numClasses", 0))
        if self.ensemble != "GBT":
            stats = self.forest.stats
            if classes <= 0:
                classes = max(len(s) for s in stats)
            self.counts = np.zeros((len(stats), classes))
            for at, counts in enumerate(stats):
                self.counts[at, : len(counts)] = counts
        super().__init__(meta, _num_features(meta, self.forest), classes)

    def raw(self, features: np.ndarray) -> np.ndarray:
        leaves = self.forest.leaves(features)
        if self.ensemble == "GBT":
            margin = _combine("GBT", self.forest.prediction[leaves], self.weights)[:, None]
            return np.hstack([-margin, margin])
        if self.ensemble == "DecisionTree":
            counts: np.ndarray = self.counts[leaves[:, 0]]
            return counts
        votes = np.zeros((len(features), self.num_classes))
        for tree in range(leaves.shape[1]):
            counts = self.counts[leaves[:, tree]]
            total = counts.sum(axis=1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                votes += np.where(total != 0, counts / total, 0.0)
        return votes

    def probability(self, raw: np.ndarray) -> np.ndarray:
        if self.ensemble == "GBT":
            # Spark's log loss: P(0) = 1 / (1 + exp(-2 * raw[0])), P(1) = 1 - P(0).
            with np.errstate(over="ignore"):
                first = 1.0 / (1.0 + np.exp(-2.0 * raw[:, :1]))
            return np.hstack([first, 1.0 - first])
        total = raw.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            return _floats(raw / total)


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
    """The fast path for these stages, or :class:`NoFastPath` naming the first it cannot take
    (its ``converted`` attribute holds the stages converted before it)."""
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
            exc.converted = converted
            raise
    return FastPipeline(converted)


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


def _floats(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


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
