"""Runtimes as plugins: a third-party runtime registered through ketch_register_runtimes,
deployed from a served file and from the command line, and the python runtime by name."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import KetchServer

Start = Callable[..., KetchServer]
SERVABLE = Path(__file__).with_name("servable.py")

TABLE_RUNTIME = """
import json
import os

import ketch


class TableRuntime(ketch.Runtime):
    \"\"\"Answers each key with its value in a JSON object.\"\"\"

    batch_input = "list"
    default_options = {"missing": None}

    def __init__(self, artifact, options):
        super().__init__(artifact, options)
        with open(artifact) as source:
            self.table = json.load(source)
        self.inputs = (ketch.TensorSpec("key", "str", ()),)

    def predict(self, batch):
        return [[self.table.get(key, self.options["missing"]), os.getpid()] for key in batch]


@ketch.hookimpl
def ketch_register_runtimes(register):
    register("table", TableRuntime)
"""

SERVED = """
import ketch


@ketch.model
def plain(xs):
    return [x + 1 for x in xs]


lookup = ketch.deploy("lookup", runtime="table", path="data/table.json", missing=-1, min_replicas=1)
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "table_runtime.py").write_text(TABLE_RUNTIME)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "table.json").write_text(json.dumps({"a": 1, "b": [2, 3]}))
    (tmp_path / "served.py").write_text(SERVED)
    return tmp_path


def test_a_plugin_runtime_serves_a_deployment_from_the_served_file(
    start_server: Start, folder: Path
) -> None:
    server = start_server(folder / "served.py", "--plugin", str(folder / "table_runtime.py"))
    response = server.predict("lookup", {"inputs": ["a", "b", "nope"]})
    assert response.status_code == 200, response.text
    values = [value for value, _ in response.json()["outputs"]]
    assert values == [1, [2, 3], -1]  # the path is relative to served.py; missing=-1 applied
    worker_pid = response.json()["outputs"][0][1]
    assert worker_pid in {w["pid"] for w in server.model_status("lookup")["workers"]}
    status = server.model_status("lookup")
    assert (status["runtime"], status["options"]) == ("table", {"missing": -1})
    assert status["artifact"] == str(folder / "data" / "table.json")
    assert status["inputs"] == [{"name": "key", "datatype": "str", "shape": []}]
    assert server.predict("plain", {"input": 1}).json()["output"] == 2


def test_inputs_unlike_the_announced_tensors_are_refused_in_the_gateway(
    start_server: Start, folder: Path
) -> None:
    server = start_server(folder / "served.py", "--plugin", str(folder / "table_runtime.py"))
    server.predict("lookup", {"input": "a"})  # the worker has announced key: str[]
    response = server.predict("lookup", {"inputs": ["a", 7]})
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == (
        "model 'lookup:1' takes inputs of {key: str[]}; input 1: key takes str[] per item, "
        "got numbers"
    )
    assert body["expected"] == [{"name": "key", "datatype": "str", "shape": []}]
    nested = server.predict("lookup", {"input": ["a", "b"]})
    assert "key takes str[] per item, got shape [2]" in nested.json()["error"]
    null = server.predict("lookup", {"input": None})
    assert "input 0: key takes str[] per item, got null" in null.json()["error"]
    assert server.predict("lookup", {"input": "b"}).json()["output"][0] == [2, 3]


def test_the_command_line_deploys_with_a_plugin_runtime_and_the_python_runtime(
    folder: Path,
) -> None:
    server = KetchServer(
        None,
        "--plugin",
        "table_runtime.py",
        "--model",
        "lookup=table:data/table.json",
        "--model",
        f"twice=python:{SERVABLE}:double",
        cwd=folder,
    )
    try:
        server.wait_ready()
        assert server.predict("lookup", {"input": "a"}).json()["output"][0] == 1
        assert server.predict("lookup", {"input": "nope"}).json()["output"][0] is None
        assert server.predict("twice", {"input": 21}).json()["output"] == 42
        assert server.model_status("twice")["runtime"] == "python"
    finally:
        server.stop()


def test_workers_in_another_interpreter_load_the_gateways_plugins_from_their_plan(
    start_server: Start, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh interpreter inherits nothing of the gateway but its environment and its
    # plan's JSON: the --plugin file named relative to the gateway's folder must reach it.
    (folder / "elsewhere.py").write_text(
        "import sys\n\nimport ketch\n\n"
        "lookup = ketch.deploy('lookup', runtime='table', path='data/table.json', "
        "python=sys.executable)\n"
    )
    monkeypatch.chdir(folder)
    server = start_server(folder / "elsewhere.py", "--plugin", "table_runtime.py")
    response = server.predict("lookup", {"input": "a"})
    assert response.status_code == 200, response.text
    value, worker_pid = response.json()["output"]
    assert value == 1
    assert worker_pid in {w["pid"] for w in server.model_status("lookup")["workers"]}


@pytest.mark.parametrize(
    ("deployment", "message"),
    [
        (
            't = ketch.deploy("t", runtime="table", path="data/table.json", mising=1)',
            "model 't' (runtime 'table'): unknown option(s) mising (this runtime takes: missing)",
        ),
        (
            't = ketch.deploy("t", runtime="table", path="data/nowhere.json")',
            "model 't' (runtime 'table'): no saved model at",
        ),
        (
            't = ketch.deploy("t", runtime="tabel", path="data/table.json")',
            "model 't': no runtime named 'tabel'; installed runtimes: ",
        ),
    ],
)
def test_a_deployment_that_cannot_be_served_stops_the_start_naming_it(
    folder: Path, deployment: str, message: str
) -> None:
    (folder / "bad.py").write_text(f"import ketch\n{deployment}\n")
    server = KetchServer(folder / "bad.py", "--plugin", str(folder / "table_runtime.py"))
    try:
        assert server.process.wait(60) == 2
        server.wait_for_stderr(re.escape(message))
    finally:
        server.stop()


def test_ketch_plugins_lists_the_runtimes(folder: Path) -> None:
    import subprocess
    import sys

    listing = subprocess.run(
        [sys.executable, "-m", "ketch.cli.main", "plugins", "--plugin", "table_runtime.py"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=folder,
    )
    assert re.search(r"^ketch\.runtimes\.torch +built in +- +torch$", listing.stdout, re.M)
    assert re.search(
        rf"^{re.escape(str(folder / 'table_runtime.py'))} +--plugin \S+ +- +table$",
        listing.stdout,
        re.M,
    )
