"""The ``spark`` runtime: serve a saved ``pyspark.ml`` PipelineModel in real time
(``pip install 'ketch[spark]'``).

The artifact is the folder a fitted pipeline was saved to
(``Pipeline(stages=[...]).fit(df).write().save(path)``). Each input is one row, a JSON object
of the pipeline's input columns (``{"age": 41, "city": "Lyon"}``), and is answered with the
row's prediction (or, with ``output=[...]``, an object of the columns asked for).

A local SparkSession takes seconds to start and hundreds of milliseconds per single-row
``transform``, so the runtime first tries the **fast path**: it reads the stages' saved
parameters (the JSON metadata and the parquet files, with pyarrow, no JVM) when the worker
loads the model, and runs them as numpy operations that compute what Spark computes
(:mod:`ketch.runtimes.spark.fastpath`, with the stages in ``spark_features``, ``spark_linear``
and ``spark_trees``). A pipeline with any other stage takes the **Spark path**: the worker
starts a local SparkSession and runs the whole pipeline through ``PipelineModel.transform``.
``describe()`` (``runtime_info`` in ``GET /models``) says which path was taken and why. Options:

- ``output``: the column to answer with (default: the last stage's prediction column, or its
  output column), or a list of columns, answered as an object per row
  (``["prediction", "probability"]``);
- ``fallback``: ``"auto"`` (default) runs a pipeline the fast path cannot take through Spark;
  ``"never"`` refuses it, naming the stage, where the model is declared;
- ``spark_conf``: settings for the Spark path's session (``{"spark.master": "local[2]"}``);
  by default a ``local[1]`` session without web UI.

The input columns (and, on the fast path, the output columns) are announced to the gateway, so
a row lacking a column or holding a value of the wrong type is a 400 naming it. Only the
Spark path imports pyspark; ``check`` reads the metadata JSON with the standard library.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ketch.errors import BatchInputError
from ketch.hookspecs import RegisterRuntime, hookimpl
from ketch.runtime import Runtime
from ketch.runtimes.spark.fastpath import (
    BUILDERS,
    FastPipeline,
    InputColumn,
    PartlyConverted,
    as_objects,
    column_values,
    convert,
    first_unsupported,
    value_kind,
)
from ketch.runtimes.spark.saved import (
    NoFastPath,
    StageMeta,
    read_json_metadata,
    read_pipeline,
    short_name,
)
from ketch.runtimes.spark.stage import Stage
from ketch.specs.models import BatchInput
from ketch.specs.signature import TensorSpec
from ketch.types import Outputs

_FALLBACKS = ("auto", "never")
#: The Spark path's session: one local core, no web UI or progress bars in the worker's output.
_SPARK_DEFAULTS = {
    "spark.master": "local[1]",
    "spark.app.name": "ketch",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "1",
}
#: How Spark reports a stage's UDF refusing a value, followed by the stage's own message.
_UDF_FAILED = "failed due to: "
_DATATYPES = {"number": "float64", "vector": "float64", "string": "str"}


class SparkRuntime(Runtime):
    """A saved ``pyspark.ml`` PipelineModel, run with numpy when every stage allows it."""

    batch_input: ClassVar[BatchInput] = "list"  # each input is a dict row of columns
    default_options: ClassVar[Mapping[str, Any]] = {
        "output": None,
        "fallback": "auto",
        "spark_conf": {},
    }

    @classmethod
    def check(cls, artifact: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
        checked = super().check(artifact, options)
        assert artifact is not None  # the base class refuses None for a path runtime
        stages = read_pipeline(Path(artifact))
        output = checked["output"]
        if isinstance(output, tuple):
            output = checked["output"] = list(output)
        if output is None:
            _main_output(stages)  # a pipeline that names no output column needs output=
        elif not (
            (isinstance(output, str) and output)
            or (
                isinstance(output, list)
                and output
                and all(isinstance(c, str) and c for c in output)
                and len(set(output)) == len(output)
            )
        ):
            raise ValueError(f"output must be a column name or a list of them, got {output!r}")
        if checked["fallback"] not in _FALLBACKS:
            raise ValueError(f"fallback must be 'auto' or 'never', got {checked['fallback']!r}")
        conf = checked["spark_conf"]
        if not isinstance(conf, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str | int | float | bool) for k, v in conf.items()
        ):
            raise ValueError(f"spark_conf must map setting names to values, got {conf!r}")
        checked["spark_conf"] = dict(conf)
        unsupported = first_unsupported(stages)
        if checked["fallback"] == "never" and unsupported is not None:
            # Found from the stages' class names alone; a stage whose saved files turn out to
            # be unreadable is reported by the worker, with the same wording.
            raise ValueError(_refused(f"stage {unsupported.label()} has no fast path"))
        return checked

    def __init__(self, artifact: str | None, options: Mapping[str, Any]) -> None:
        super().__init__(artifact, options)
        assert artifact is not None
        self.stages = read_pipeline(Path(artifact))
        self.saved_by = str(read_json_metadata(Path(artifact)).get("sparkVersion", "unknown"))
        self.fast: FastPipeline | None = None
        self.reason: str | None = None
        known: tuple[InputColumn, ...] = ()
        try:
            self.fast = convert(self.stages)
        except PartlyConverted as exc:
            self.reason = str(exc)
            known = _known_inputs(exc.converted)
        wanted = self.options["output"]
        self.columns: list[str] = (
            list(wanted) if isinstance(wanted, list) else [wanted or _main_output(self.stages)]
        )
        self.single = not isinstance(wanted, list)
        if self.fast is not None:
            missing = [c for c in self.columns if c not in self.fast.kinds]
            if missing:
                declared = _declared_columns(self.stages)
                if missing[0] not in declared:
                    raise ValueError(
                        f"the pipeline has no column {missing[0]!r} to answer with (it has: "
                        f"{', '.join(sorted({*self.fast.kinds, *declared}))})"
                    )
                self.reason = f"column {missing[0]!r} is not computed by the fast path"
                known, self.fast = self.fast.inputs, None
        self.spark: _SparkPath | None = None
        if self.fast is None:
            if self.options["fallback"] == "never":
                raise ValueError(_refused(str(self.reason)))
            # Only here, in the worker, is pyspark imported and a JVM started.
            self.spark = _SparkPath(artifact, self.options["spark_conf"], known)
            known_columns = known
        else:
            known_columns = self.fast.inputs
            self.outputs = tuple(
                TensorSpec(c, _DATATYPES[k], (-1,) if k == "vector" else ())
                for c in self.columns
                for k in [self.fast.kinds[c]]
            )
        self.inputs = tuple(
            TensorSpec(c.name, _DATATYPES[c.kind], (c.size,) if c.kind == "vector" else ())
            for c in known_columns
        )

    def predict(self, batch: Any) -> Outputs:
        rows = list(batch)
        if self.fast is None:
            assert self.spark is not None
            answers = self.spark.predict(rows, self.columns)
            if self.single:
                return [answer[0] for answer in answers]
            return [dict(zip(self.columns, answer, strict=True)) for answer in answers]
        columns = self.fast.run(rows)
        lists = [_plain(columns[c]) for c in self.columns]
        if self.single:
            return lists[0]
        return [dict(zip(self.columns, values, strict=True)) for values in zip(*lists, strict=True)]

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"path": "fast" if self.fast is not None else "spark"}
        if self.reason is not None:
            info["reason"] = self.reason
        info["stages"] = [stage.name for stage in self.stages]
        info["output"] = self.columns if not self.single else self.columns[0]
        info["saved_by_spark"] = self.saved_by
        if self.spark is not None:
            info["spark"] = self.spark.version
        return info


def _refused(reason: str) -> str:
    fast = ", ".join(sorted({short_name(c) for c in BUILDERS}))
    return f"{reason}, and fallback='never' forbids running it through Spark (fast path: {fast})"


def _known_inputs(converted: list[Stage]) -> tuple[InputColumn, ...]:
    """The input columns of the stages before the first one the fast path cannot take: the
    Spark path checks those as the fast path would (later stages' inputs are unknown)."""
    try:
        return FastPipeline(converted).inputs
    except NoFastPath:
        return ()


def _main_output(stages: Sequence[StageMeta]) -> str:
    """The column a pipeline answers with by default: its last stage's prediction column, or
    its output column for a pipeline of feature transformers."""
    last = stages[-1] if stages else None
    params = last.params if last is not None else {}
    outputs = params.get("outputCols") if "inputCols" in params else None
    for candidate in (
        params.get("predictionCol"),
        outputs and outputs[-1],
        params.get("outputCol"),
    ):
        if isinstance(candidate, str) and candidate:
            return candidate
    what = "it has no stages" if last is None else f"its last stage {last.label()} names none"
    raise ValueError(f"cannot tell which column the pipeline answers with ({what}): give output=")


def _declared_columns(stages: Sequence[StageMeta]) -> set[str]:
    """Every column some stage's parameters name (``*Col``, ``*Cols``)."""
    columns: set[str] = set()
    for stage in stages:
        for key, value in stage.params.items():
            if key.endswith("Col") and isinstance(value, str) and value:
                columns.add(value)
            elif key.endswith("Cols") and isinstance(value, list):
                columns.update(str(v) for v in value)
    return columns


def _plain(column: Any) -> list[Any]:
    return column.tolist() if isinstance(column, np.ndarray) else list(column)


class _SparkPath:
    """The whole pipeline through ``PipelineModel.transform`` in a local SparkSession."""

    def __init__(self, path: str, conf: Mapping[str, Any], known: Sequence[InputColumn]) -> None:
        sql = importlib.import_module("pyspark.sql")
        self.types = importlib.import_module("pyspark.sql.types")
        self.linalg = importlib.import_module("pyspark.ml.linalg")
        errors = importlib.import_module("pyspark.errors")
        #: Spark's answers to inputs it cannot take: an unknown column, a wrong type.
        self.input_errors = (errors.AnalysisException, errors.IllegalArgumentException)
        self.java_error = importlib.import_module("py4j.protocol").Py4JJavaError
        builder = sql.SparkSession.builder
        for key, value in {**_SPARK_DEFAULTS, **conf}.items():
            builder = builder.config(key, str(value).lower() if isinstance(value, bool) else value)
        self.session = builder.getOrCreate()
        self.session.sparkContext.setLogLevel("ERROR")
        self.version = str(self.session.version)
        self.model = importlib.import_module("pyspark.ml").PipelineModel.load(path)
        self.known = {column.name: column for column in known}
        self.pid = os.getpid()

    def predict(self, rows: list[Any], columns: list[str]) -> list[list[Any]]:
        if os.getpid() != self.pid:
            # The session talks to its JVM over the loading process's py4j connection, which
            # workers forked from a template (preload=True) would share.
            raise RuntimeError(
                "the Spark path cannot run in a worker forked from the process that started "
                "its SparkSession (preload=True): deploy this model without preload"
            )
        frame = self._frame(rows)
        try:
            result = self.model.transform(frame)
            missing = [c for c in columns if c not in result.columns]
            if missing:
                raise ValueError(
                    f"the pipeline has no column {missing[0]!r} to answer with (it has: "
                    f"{', '.join(result.columns)})"
                )
            collected = result.select(*columns).collect()
        except self.input_errors as exc:
            raise BatchInputError(
                f"Spark cannot run the pipeline on these inputs: {_first(exc)}"
            ) from None
        except self.java_error as exc:
            # A stage refusing a value (an unseen label, a null) fails inside Spark's UDF; any
            # other failure of the JVM is the model's own error (a 500).
            cause = str(exc).partition(_UDF_FAILED)[2]
            if not cause:
                raise
            reason = cause.removeprefix("org.apache.spark.SparkException: ").split(" SQLSTATE")[0]
            raise BatchInputError(f"Spark refused an input: {reason.strip().rstrip('.')}") from None
        if len(collected) != len(rows):
            raise BatchInputError(
                f"the pipeline dropped {len(rows) - len(collected)} of {len(rows)} inputs "
                "(a stage with handleInvalid='skip', or a filter)"
            )
        return [[_spark_value(value) for value in row] for row in collected]

    def _frame(self, rows: list[Any]) -> Any:
        """A DataFrame of the rows: known input columns checked as on the fast path, the
        others typed from their values (numbers as doubles, lists of numbers as vectors)."""
        rows = list(as_objects(rows, tuple(self.known.values())))
        names: dict[str, None] = {}
        for row in rows:
            names.update(dict.fromkeys(row))
        names.update(dict.fromkeys(self.known))
        types = self.types
        fields, data = [], []
        for name in names:
            known = self.known.get(name)
            kind: str
            if known is not None:
                column_values(known, rows, tuple(self.known.values()))
                kind = known.kind
            else:
                kind = _inferred_kind(name, rows)
            values = [row.get(name) for row in rows]
            if kind == "vector":
                values = [None if v is None else self.linalg.Vectors.dense(v) for v in values]
                spark_type = self.linalg.VectorUDT()
            elif kind == "number":
                values = [None if v is None else float(v) for v in values]
                spark_type = types.DoubleType()
            elif kind == "boolean":
                spark_type = types.BooleanType()
            else:
                spark_type = types.StringType()
            fields.append(types.StructField(name, spark_type, True))
            data.append(values)
        schema = types.StructType(fields)
        return self.session.createDataFrame(list(zip(*data, strict=True)), schema)


def _inferred_kind(name: str, rows: list[Any]) -> str:
    """What a column the fast path could not type holds, from its values in the batch."""
    kinds = set()
    for index, row in enumerate(rows):
        if name not in row:
            raise BatchInputError(f"input {index} has no column {name!r} (other inputs have it)")
        if row[name] is not None:
            kinds.add(value_kind(row[name]))
    if len(kinds) > 1 or "other" in kinds:
        raise BatchInputError(
            f"column {name!r} must hold numbers, strings, booleans or lists of numbers, of one "
            f"kind in every input; got {', '.join(sorted(kinds))}"
        )
    # A column null in every row of the batch: a double is what most stages can take.
    return kinds.pop() if kinds else "number"


def _first(exc: Exception) -> str:
    """The first line of Spark's message (the rest is its query plan)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _spark_value(value: Any) -> Any:
    # Vectors become lists; Row values are already plain Python (float, str, int).
    return value.toArray().tolist() if hasattr(value, "toArray") else value


@hookimpl
def ketch_register_runtimes(register: RegisterRuntime) -> None:
    register("spark", SparkRuntime)
