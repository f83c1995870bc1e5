"""A saved ``pyspark.ml`` PipelineModel read from its files, without a JVM.

A saved PipelineModel is a folder::

    metadata/part-00000            JSON: class, uid, paramMap, defaultParamMap, sparkVersion
    stages/NN_UID/metadata/...     each stage's JSON, likewise
    stages/NN_UID/data/*.parquet   a fitted stage's parameters (vectors, matrices, tree nodes)
    stages/NN_UID/treesMetadata/   tree ensembles: one row per tree, with its weight

:func:`read_pipeline` needs only the standard library, so the runtime's ``check`` can use it
where the model is declared. :func:`read_table` reads a stage's parquet files with pyarrow
(imported there, in the worker), and :func:`read_vector` / :func:`read_matrix` decode the
vectors and matrices Spark saved in them.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PIPELINE_CLASS = "org.apache.spark.ml.PipelineModel"


#: Models whose estimator's name ends in Classifier / Regressor rather than in the model's.
_ESTIMATOR_SUFFIXED = ("DecisionTree", "RandomForest", "GBT", "FM", "MultilayerPerceptron")


class NoFastPath(Exception):
    """A stage the fast path cannot run; the message names the stage and why."""


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


def read_table(folder: Path) -> dict[str, list[Any]]:
    """The parquet files in ``folder`` as columns, struct fields flattened to ``a.b``."""
    try:
        pq = importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise NoFastPath("pyarrow is not installed (pip install 'ketch[spark]')") from None
    table = pq.read_table(str(folder))
    while any(str(field.type).startswith("struct<") for field in table.schema):
        table = table.flatten()
    return {name: table.column(name).to_pylist() for name in table.column_names}


def read_vector(data: Mapping[str, list[Any]], name: str, row: int = 0) -> np.ndarray:
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


def read_matrix(data: Mapping[str, list[Any]], name: str, row: int = 0) -> np.ndarray:
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
