"""Small ``pyspark.ml`` pipelines fitted on synthetic rows with a local SparkSession and saved,
for the ``spark`` runtime's test (``tests/frameworks/test_spark.py`` imports this module as
``benchmarks.spark_pipelines``) and for ``bench_spark.py``, which serves the ``churn`` one.

It imports neither ketch nor pytest, and pyspark only inside the functions that use it, so
``bench_spark.py --help`` runs without pyspark::

    with local_spark() as spark:
        models = fit_pipelines(spark, folder, ["churn"])  # saved to folder / "churn"
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pyspark.ml import PipelineModel
    from pyspark.sql import SparkSession

#: The columns of a request row: three numbers and a colour.
COLUMNS = ("a", "b", "c", "color")
COLORS = ("red", "green", "blue")
#: How many synthetic rows the pipelines are fitted on, and the seed they are drawn with.
TRAINING_ROWS = 200
TRAINING_SEED = 0


def synthetic_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Rows of three normal numbers and a colour, with the labels the pipelines learn:
    ``label`` (binary), ``y`` (a number) and ``cls3`` (three classes)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        a, b, c = (float(v) for v in rng.normal(size=3))
        color = COLORS[int(rng.integers(3))]
        rows.append(
            {
                "a": a,
                "b": b,
                "c": c,
                "color": color,
                "label": float(a + b + rng.normal() > 0),
                "y": 2 * a - b + 0.5 * c + (color == "red") + float(rng.normal()) * 0.1,
                "cls3": float(0 if a < -0.3 else (1 if b < 0 else 2)),
            }
        )
    return rows


@contextmanager
def local_spark() -> Iterator[SparkSession]:
    """A ``local[1]`` SparkSession without web UI or progress bars, logging errors only;
    stopped on leaving the block."""
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[1]")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "1")
        .getOrCreate()
    )
    try:
        spark.sparkContext.setLogLevel("ERROR")
        yield spark
    finally:
        spark.stop()


def pipelines() -> dict[str, list[Any]]:
    """The unfitted stages of each pipeline, by name (made in the JVM: a SparkSession must be
    running). All but ``sql`` (its SQLTransformer) take the spark runtime's numpy fast path."""
    from pyspark.ml.classification import LogisticRegression, RandomForestClassifier
    from pyspark.ml.feature import (
        MinMaxScaler,
        OneHotEncoder,
        SQLTransformer,
        StandardScaler,
        StringIndexer,
        VectorAssembler,
    )
    from pyspark.ml.regression import GBTRegressor, LinearRegression

    def assembler(*columns: str, output: str = "features") -> VectorAssembler:
        return VectorAssembler(inputCols=list(columns or ["a", "b", "c"]), outputCol=output)

    return {
        "churn": [
            StringIndexer(inputCol="color", outputCol="color_index", handleInvalid="keep"),
            OneHotEncoder(inputCols=["color_index"], outputCols=["color_vector"]),
            assembler("a", "b", "c", "color_vector", output="raw"),
            StandardScaler(inputCol="raw", outputCol="features", withMean=True, withStd=True),
            LogisticRegression(labelCol="label", regParam=0.01),
        ],
        "multi": [
            assembler(output="raw"),
            MinMaxScaler(inputCol="raw", outputCol="features", min=-1.0, max=1.0),
            LogisticRegression(labelCol="cls3", family="multinomial", regParam=0.05),
        ],
        "linear": [assembler(), LinearRegression(labelCol="y", regParam=0.01)],
        "forest": [assembler(), RandomForestClassifier(labelCol="cls3", numTrees=5, maxDepth=4)],
        "boosted": [assembler(), GBTRegressor(labelCol="y", maxIter=5, maxDepth=3)],
        "sql": [
            SQLTransformer(statement="SELECT *, a * b AS ab FROM __THIS__"),
            assembler("a", "b", "ab"),
            LinearRegression(labelCol="y"),
        ],
    }


def fit_pipelines(
    spark: SparkSession, folder: Path, names: Iterable[str] | None = None
) -> dict[str, PipelineModel]:
    """Fit the named pipelines (every one of :func:`pipelines` by default) on
    :data:`TRAINING_ROWS` synthetic rows and save each to ``folder / name``."""
    from pyspark.ml import Pipeline

    training = synthetic_rows(TRAINING_ROWS, seed=TRAINING_SEED)
    train = spark.createDataFrame([tuple(r.values()) for r in training], list(training[0]))
    stages = pipelines()
    models = {}
    for name in stages if names is None else names:
        models[name] = Pipeline(stages=stages[name]).fit(train)
        models[name].write().save(str(folder / name))
    return models
