"""The spark runtime against real Spark: small pipelines the test fits on synthetic data with
a local SparkSession and saves (``benchmarks/spark_pipelines.py``, which ``bench_spark.py``
shares), served through one `ketch serve`, and compared row by row with Spark's own
``transform()``.

Every pipeline but one takes the numpy fast path (no JVM in the worker); the one with a
SQLTransformer takes the Spark path, and ``GET /models`` says which and why."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.spark_pipelines import COLUMNS, fit_pipelines, local_spark, synthetic_rows
from ketch.errors import BatchInputError
from ketch.runtimes.spark.fastpath import InputColumn, as_objects
from ketch.runtimes.spark.runtime import SparkRuntime
from tests.conftest import KetchServer

# Fitting with a local Spark and starting a JVM in a worker take tens of seconds on 2 cores.
pytestmark = pytest.mark.timeout(300)
#: How long the server may take to start, the Spark path's worker starting a JVM included.
READY_TIMEOUT_S = 150.0

SERVED = """
import ketch

both = ["prediction", "probability"]
churn = ketch.deploy("churn", runtime="spark", path="churn", output=both, min_replicas=1)
multi = ketch.deploy("multi", runtime="spark", path="multi", output=both, min_replicas=1)
forest = ketch.deploy(
    "forest", runtime="spark", path="forest", output=[*both, "rawPrediction"], min_replicas=1
)
boosted = ketch.deploy("boosted", runtime="spark", path="boosted", min_replicas=1, max_batch_size=8)
sql = ketch.deploy("sql", runtime="spark", path="sql", min_replicas=1)
"""

STRICT = """
import ketch

strict = ketch.deploy("strict", runtime="spark", path="sql", fallback="never")
"""

#: What each served model answers with: all of these columns, or the prediction alone.
OUTPUTS = {
    "churn": ["prediction", "probability"],
    "multi": ["prediction", "probability"],
    "forest": ["prediction", "probability", "rawPrediction"],
    "boosted": ["prediction"],
    "linear": ["prediction"],
    "sql": ["prediction"],
}
CLASSIFIERS = {"churn", "multi", "forest"}
ROW = {"a": 0.5, "b": -1.0, "c": 2.0, "color": "green"}


@dataclass
class Saved:
    folder: Path
    #: The request rows, and what Spark's transform gives for each, per model.
    rows: list[dict[str, Any]]
    expected: dict[str, list[dict[str, Any]]]
    sql_uid: str
    #: `ketch serve` on the served file and ``--model linear=spark:linear``.
    server: KetchServer


def plain(value: Any) -> Any:
    return value.toArray().tolist() if hasattr(value, "toArray") else value


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Saved]:
    """The pipelines fitted and saved, Spark's answers for the test rows, and the served
    file's `ketch serve` starting (its Spark-path worker starts a JVM, which takes a while:
    it does so while this process asks Spark for the expected answers)."""
    folder = tmp_path_factory.mktemp("spark")
    (folder / "served.py").write_text(textwrap.dedent(SERVED))
    (folder / "strict.py").write_text(textwrap.dedent(STRICT))
    (folder / "empty").mkdir()
    # Fresh rows, a colour never seen in training (the indexer keeps it), integers.
    rows = [{k: r[k] for k in COLUMNS} for r in synthetic_rows(30, seed=1)]
    rows += [
        {"a": 0.25, "b": -0.5, "c": 1.5, "color": "purple"},
        {"a": 1, "b": -2, "c": 0, "color": "red"},
    ]
    server = None
    try:
        with local_spark() as spark:
            models = fit_pipelines(spark, folder)
            # A fitted model saved alone is not a pipeline.
            models["sql"].stages[-1].write().save(str(folder / "lonely"))
            server = KetchServer(
                folder / "served.py", "--model", f"linear=spark:{folder / 'linear'}"
            )
            test = spark.createDataFrame(
                [(float(r["a"]), float(r["b"]), float(r["c"]), r["color"]) for r in rows],
                list(COLUMNS),
            )
            expected = {
                name: [
                    {k: plain(v) for k, v in row.asDict().items()}
                    for row in model.transform(test).select(*OUTPUTS[name]).collect()
                ]
                for name, model in models.items()
            }
        # Spark has stopped, which frees the core for ketch's workers.
        yield Saved(folder, rows, expected, models["sql"].stages[0].uid, server)
    finally:
        if server is not None:
            server.stop()


def wait_ready(server: KetchServer, timeout: float = READY_TIMEOUT_S) -> KetchServer:
    """``KetchServer.wait_ready`` with a deadline long enough for a JVM to start."""
    server.broker = server.wait_for(r"broker listening on (\S+)", timeout).group(1)
    server.url = server.wait_for(r"listening on (http://\S+)", timeout).group(1)
    server.wait_for(r"^ketch: ready$", timeout)
    server.client.base_url = server.url
    return server


@pytest.fixture(scope="module")
def served(saved: Saved) -> KetchServer:
    return wait_ready(saved.server)


def outputs(server: KetchServer, model: str, rows: Any) -> Any:
    response = server.predict(model, {"inputs": rows})
    assert response.status_code == 200, response.text
    return response.json()["outputs"]


def assert_same(model: str, got: list[Any], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    columns = OUTPUTS[model]
    for row, (answer, spark) in enumerate(zip(got, want, strict=True)):
        answer = answer if isinstance(answer, dict) else {"prediction": answer}
        assert list(answer) == columns, f"row {row}"
        for column in columns:
            if column == "prediction" and model in CLASSIFIERS:
                assert answer[column] == spark[column], f"{model} row {row}: {answer} vs {spark}"
            else:
                np.testing.assert_allclose(
                    answer[column], spark[column], rtol=0, atol=1e-6, err_msg=f"{model} row {row}"
                )


@pytest.mark.parametrize("model", ["churn", "multi", "forest", "boosted", "linear", "sql"])
def test_every_row_is_answered_as_spark_transform_answers_it(
    served: KetchServer, saved: Saved, model: str
) -> None:
    assert_same(model, outputs(served, model, saved.rows), saved.expected[model])
    single = served.predict(model, {"input": saved.rows[-1]})
    assert single.status_code == 200, single.text
    assert_same(model, [single.json()["output"]], saved.expected[model][-1:])


def test_concurrent_rows_are_batched_with_the_same_answers(
    served: KetchServer, saved: Saved
) -> None:
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda row: served.predict("boosted", {"input": row}), saved.rows))
    assert all(a.status_code == 200 for a in answers)
    assert_same("boosted", [a.json()["output"] for a in answers], saved.expected["boosted"])


def test_models_say_which_path_they_take_and_why(served: KetchServer, saved: Saved) -> None:
    churn = served.model_status("churn")
    assert churn["runtime"] == "spark"
    info = churn["runtime_info"]
    assert info["path"] == "fast" and "reason" not in info
    assert info["stages"] == [
        "StringIndexer",
        "OneHotEncoder",
        "VectorAssembler",
        "StandardScaler",
        "LogisticRegression",
    ]
    assert churn["inputs"] == [
        {"name": "color", "datatype": "str", "shape": []},
        *({"name": c, "datatype": "float64", "shape": []} for c in "abc"),
    ]
    assert served.model_status("forest")["runtime_info"]["stages"] == [
        "VectorAssembler",
        "RandomForestClassifier",
    ]
    sql = served.model_status("sql")["runtime_info"]
    assert sql["path"] == "spark"
    assert sql["reason"] == f"stage SQLTransformer (uid {saved.sql_uid}) has no fast path"
    assert sql["stages"] == ["SQLTransformer", "VectorAssembler", "LinearRegression"]


@pytest.mark.parametrize(
    ("model", "row", "message"),
    [
        # Refused by the gateway, against the input columns the worker announced.
        ("churn", {"a": 1.0, "b": 2.0, "color": "red"}, "input 0: an input lacks c"),
        ("churn", {"a": "1", "b": 2.0, "c": 0.0, "color": "red"}, "a takes float64[] per item"),
        ("churn", {"a": 1.0, "b": 2.0, "c": 0.0, "color": 7}, "color takes str[] per item"),
        ("multi", [1.0, 2.0, 3.0], "an input must be an object with a, b, c"),
        # Refused by the runtime: booleans are numbers to numpy, not to the pipeline.
        ("churn", {"a": 1.0, "b": 2.0, "c": True, "color": "red"}, "column 'c' must be a number"),
        # Refused by Spark, in the Spark path's worker.
        ("sql", {"a": 1.0, "c": 0.0}, "`b` cannot be resolved"),
        ("sql", {"a": 1.0, "b": "x"}, "column b is not supported"),
    ],
)
def test_a_bad_row_is_a_400_naming_the_column(
    served: KetchServer, saved: Saved, model: str, row: Any, message: str
) -> None:
    outputs(served, model, saved.rows[:1])  # the worker has announced its input columns
    response = served.predict(model, {"input": row})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert_same(model, outputs(served, model, saved.rows[:2]), saved.expected[model][:2])


@pytest.mark.parametrize(
    ("model", "rows", "message"),
    [
        ("churn", [{"a": 1.0, "b": 2.0, "color": "red"}], "input 0 has no column 'c'"),
        ("churn", [ROW, {**ROW, "a": "1"}], "column 'a' must be a number, got a string '1' in"),
        ("churn", [{**ROW, "color": None}, {**ROW, "color": 7}], "column 'color' must be a str"),
        ("churn", [ROW, [1.0, 2.0]], "input 1 must be an object of columns (color, a, b, c)"),
        ("multi", [{**ROW, "b": None}], "column 'b' is null or NaN in input 0, which the pipe"),
    ],
)
def test_the_runtime_checks_rows_the_gateway_has_not(
    saved: Saved, model: str, rows: list[Any], message: str
) -> None:
    # Requests queued before a worker announced its inputs reach the runtime unchecked. The
    # fast path needs no JVM, so the runtime runs here, in the test's process.
    runtime = SparkRuntime(str(saved.folder / model), {"output": "probability"})
    with pytest.raises(BatchInputError) as refused:
        runtime.predict(rows)
    assert message in str(refused.value)
    # null is an unseen colour to an indexer with handleInvalid="keep", as in Spark.
    assert len(runtime.predict([{**ROW, "color": None}])) == 1


def test_a_pipeline_reading_one_column_takes_its_bare_value_too() -> None:
    column = InputColumn("x", "number")
    assert as_objects([1.5, {"x": 2.0}], [column]) == [{"x": 1.5}, {"x": 2.0}]
    with pytest.raises(BatchInputError, match=re.escape("input 0 must be an object of columns")):
        as_objects([1.5], [column, InputColumn("y", "number")])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"output": []}, "output must be a column name or a list of them, got []"),
        ({"output": ["a", "a"]}, "output must be a column name or a list of them"),
        ({"fallback": "sometimes"}, "fallback must be 'auto' or 'never', got 'sometimes'"),
        ({"spark_conf": {"spark.master": None}}, "spark_conf must map setting names to values"),
        ({"device": "cpu"}, "unknown option(s) device (this runtime takes: fallback, output, "),
    ],
)
def test_options_are_checked_where_the_model_is_declared(
    saved: Saved, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SparkRuntime.check(str(saved.folder / "churn"), options)
    checked = SparkRuntime.check(str(saved.folder / "churn"), {"output": ("prediction",)})
    assert checked == {"output": ["prediction"], "fallback": "auto", "spark_conf": {}}


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("gone=spark:nowhere", "model 'gone' (runtime 'spark'): no saved model at"),
        ("lonely=spark:lonely", "holds a saved org.apache.spark.ml.regression.Linear"),
        ("empty=spark:empty", "is not a saved Spark PipelineModel: it has no metadata/ folder"),
    ],
)
def test_a_folder_that_is_no_pipeline_stops_the_start(
    saved: Saved, argument: str, message: str
) -> None:
    server = KetchServer(None, "--model", argument, cwd=saved.folder)
    try:
        assert server.process.wait(60) == 2
        server.wait_for_stderr(re.escape(message))
    finally:
        server.stop()


def test_fallback_never_refuses_a_pipeline_naming_the_stage(saved: Saved) -> None:
    server = KetchServer(saved.folder / "strict.py")
    try:
        assert server.process.wait(60) == 2
        server.wait_for_stderr(
            re.escape(
                f"model 'strict' (runtime 'spark'): stage SQLTransformer (uid {saved.sql_uid}) "
                "has no fast path, and fallback='never' forbids running it through Spark"
            )
        )
    finally:
        server.stop()
    # Refused where declared, before the gateway listened or started a worker (no JVM).
    printed = []
    while (line := server.lines.get(timeout=10)) is not None:
        printed.append(line)
    assert printed == ["ketch: stopped"]
