"""The triton runtime against a real Triton Inference Server: the one PyTriton bundles, which
runs on CPU, serving the small numpy models of ``benchmarks/pytriton_server.py`` (which also
starts and stops it for ``benchmarks/bench_triton.py``). ketch serves them over HTTP, and its
answers are compared with calling Triton directly through tritonclient.

PyTriton pins numpy < 2, so it lives in a virtualenv of its own, made once per PyTriton
version and Python under ``$KETCH_TEST_CACHE`` (default ``~/.cache/ketch-tests``): the first
run pays the install (about a minute), later runs reuse it.
"""

from __future__ import annotations

import fcntl
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from benchmarks.pytriton_server import (
    AFFINE_B,
    AFFINE_W,
    MODELS,
    PYTRITON_VERSION,
    REFUSED,
    START_TIMEOUT_S,
    cached_venv,
    free_ports,
    run_server,
)
from ketch.errors import BatchInputError
from ketch.runtimes.triton import TritonRuntime
from tests.conftest import KetchServer

#: Installing PyTriton (~370 MB unpacked) on a first run.
INSTALL_TIMEOUT_S = 900
#: The first test's budget includes the install; the others are far quicker.
pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT_S + START_TIMEOUT_S)

W = np.array(AFFINE_W, dtype=np.float32)
B = np.array(AFFINE_B, dtype=np.float32)
#: Triton's own batch limit for "affine": ketch must split bigger batches.
AFFINE_MAX_BATCH = 8

SERVED = """
import ketch

affine = ketch.deploy("affine", runtime="triton", url="{http}", model="affine", max_delay_ms=2,
                      min_replicas=1)
affine_grpc = ketch.deploy("affine_grpc", runtime="triton", url="{grpc}", model="affine",
                           protocol="grpc", preload=True, min_replicas=1)
two_io = ketch.deploy("two_io", runtime="triton", url="{http}", model="two_io", min_replicas=1)
ghost = ketch.deploy("ghost", runtime="triton", url="{http}", model="ghost", ready_timeout_s=0.2)
offline = ketch.deploy("offline", runtime="triton", url="{offline}", model="affine",
                       ready_timeout_s=0.2)
"""


@dataclass(frozen=True)
class TritonServer:
    http: str
    grpc: str
    log: Path

    def client(self) -> Any:
        return triton_http.InferenceServerClient(self.http)

    def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs, asked of Triton directly."""
        requests = []
        for name, array in inputs.items():
            request = triton_http.InferInput(
                name, list(array.shape), np_to_triton_dtype(array.dtype)
            )
            request.set_data_from_numpy(array)
            requests.append(request)
        client = self.client()
        try:
            result = client.infer(model, requests)
            outputs = client.get_model_metadata(model)["outputs"]
            return {o["name"]: result.as_numpy(o["name"]) for o in outputs}
        finally:
            client.close()

    def executions(self, model: str) -> tuple[int, int]:
        """(items inferred, model executions) so far, from Triton's statistics."""
        client = self.client()
        try:
            (stats,) = client.get_inference_statistics(model)["model_stats"]
            return int(stats["inference_count"]), int(stats["execution_count"])
        finally:
            client.close()


@pytest.fixture(scope="session")
def pytriton_python() -> Path:
    """The interpreter of a virtualenv with PyTriton, made on first use and then reused (a
    lock keeps two test runs from building it at once; a marker file says it is complete)."""
    venv = cached_venv()
    python = venv / "bin" / "python"
    done = venv / ".complete"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(venv, ignore_errors=True)  # a half-made one from an interrupted run
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            install = [str(python), "-m", "pip", "install", "-q"]
            subprocess.run(
                [*install, f"nvidia-pytriton=={PYTRITON_VERSION}"],
                check=True,
                timeout=INSTALL_TIMEOUT_S,
            )
            done.write_text(f"nvidia-pytriton=={PYTRITON_VERSION}\n")
    return python


@pytest.fixture(scope="module")
def triton(
    pytriton_python: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """PyTriton's server on free ports, in its own process group, stopped (and its group
    killed) at the end, also when the test fails."""
    folder = tmp_path_factory.mktemp("triton")
    with run_server(pytriton_python, folder, affine_max_batch_size=AFFINE_MAX_BATCH) as endpoints:
        server = TritonServer(endpoints.http, endpoints.grpc, endpoints.log)
        client = server.client()
        assert all(client.is_model_ready(m) for m in MODELS)
        client.close()
        yield server


@pytest.fixture(scope="module")
def served(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KetchServer]:
    """One `ketch serve` for every model: a served file, plus `lengths` from the command
    line as `NAME=triton:grpc://HOST:PORT/MODEL`."""
    folder = tmp_path_factory.mktemp("served")
    (offline,) = free_ports(1)
    source = SERVED.format(http=triton.http, grpc=triton.grpc, offline=f"127.0.0.1:{offline}")
    (folder / "served.py").write_text(source)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KETCH_STATE_DIR", str(folder / "state"))
        server = KetchServer(
            folder / "served.py", "--model", f"lengths=triton:grpc://{triton.grpc}/lengths"
        )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def answer(server: KetchServer, model: str, inputs: Any) -> Any:
    response = server.predict(model, {"inputs": inputs})
    assert response.status_code == 200, response.text
    return response.json()["outputs"]


def rows(count: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(count, 3)).round(3).tolist()


def affine_directly(triton: TritonServer, items: list[list[float]]) -> np.ndarray:
    x = np.asarray(items, dtype=np.float32)
    chunks = [x[i : i + AFFINE_MAX_BATCH] for i in range(0, len(x), AFFINE_MAX_BATCH)]
    return np.concatenate([triton.infer("affine", {"x": chunk})["y"] for chunk in chunks])


@pytest.mark.parametrize("model", ["affine", "affine_grpc"])
def test_answers_are_tritons_over_http_and_grpc_with_batches_split_to_its_limit(
    served: KetchServer, triton: TritonServer, model: str
) -> None:
    items = rows(3 * AFFINE_MAX_BATCH + 3)  # Triton refuses more than 8 in one call
    expected = affine_directly(triton, items)
    np.testing.assert_allclose(expected, np.asarray(items, np.float32) @ W + B, rtol=1e-6)
    # ketch writes float32 outputs in their shortest form: they read back as float32.
    np.testing.assert_allclose(np.float32(answer(served, model, items)), expected, rtol=1e-6)
    single = served.predict(model, {"input": items[0]}).json()["output"]
    np.testing.assert_allclose(np.float32(single), expected[0], rtol=1e-6)


def test_a_model_with_two_inputs_and_two_outputs_answers_a_dict_per_input(
    served: KetchServer, triton: TritonServer
) -> None:
    # "a" has a variable length: items of different lengths go to Triton in separate calls.
    items = [
        {"a": [1.0, 2.0], "n": [3, 4]},
        {"a": [0.5, 0.25, 0.125], "n": [-1, 7]},
        {"a": [2.0, -2.0], "n": [0, 1]},
    ]
    answers = answer(served, "two_io", items)
    for item, got in zip(items, answers, strict=True):
        direct = triton.infer(
            "two_io", {"a": np.array([item["a"]], np.float32), "n": np.array([item["n"]])}
        )
        assert got == {
            "total": direct["total"][0].tolist(),
            "doubled": direct["doubled"][0].tolist(),
        }


def test_strings_go_in_and_come_out_decoded(served: KetchServer, triton: TritonServer) -> None:
    words = ["héllo", "ab", ""]
    direct = triton.infer("lengths", {"text": np.array([[w] for w in words], dtype=np.object_)})
    answers = answer(served, "lengths", [[w] for w in words])
    assert answers == [
        {"length": [int(n)], "upper": [u.decode()]}
        for (n,), (u,) in zip(direct["length"], direct["upper"], strict=True)
    ]
    assert [a["upper"] for a in answers] == [["HÉLLO"], ["AB"], [""]]


def test_the_gateway_shows_tensors_and_the_server_it_forwards_to(
    served: KetchServer, triton: TritonServer
) -> None:
    status = served.model_status("two_io")
    assert (status["runtime"], status["batch_input"]) == ("triton", "list")
    assert status["inputs"] == [
        {"name": "a", "datatype": "float32", "shape": [-1]},
        {"name": "n", "datatype": "int64", "shape": [2]},
    ]
    assert status["outputs"] == [
        {"name": "total", "datatype": "float32", "shape": [1]},
        {"name": "doubled", "datatype": "int64", "shape": [2]},
    ]
    assert status["runtime_info"] == {
        "url": triton.http,
        "model": "two_io",
        "model_version": "",
        "versions": ["1"],
        "protocol": "http",
        "max_batch_size": 16,
        "platform": "python",
    }
    grpc = served.model_status("affine_grpc")
    assert grpc["inputs"] == [{"name": "x", "datatype": "float32", "shape": [3]}]
    assert grpc["runtime_info"]["protocol"] == "grpc"
    assert grpc["runtime_info"]["max_batch_size"] == AFFINE_MAX_BATCH
    strings = served.model_status("lengths")
    assert strings["inputs"] == [{"name": "text", "datatype": "str", "shape": [1]}]
    assert strings["options"]["url"] == triton.grpc


@pytest.mark.parametrize(
    ("model", "item", "message"),
    [
        ("affine", [1.0, 2.0, 3.0, 4.0], "x takes float32[3] per item, got shape [4]"),
        ("affine_grpc", ["a", "b", "c"], "x takes float32[3] per item, got strings"),
        ("two_io", {"a": [1.0]}, "an input lacks n"),
        ("two_io", [1.0, 2.0], "an input must be an object with a, n, got a JSON array"),
    ],
)
def test_the_gateway_answers_400_naming_the_tensors_before_a_batch(
    served: KetchServer, model: str, item: Any, message: str
) -> None:
    response = served.predict(model, {"inputs": [item]})
    assert response.status_code == 400, response.text
    body = response.json()
    assert message in body["error"]
    assert body["expected"] == served.model_status(model)["inputs"]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"a": [1.0], "n": [1.5, 2.0]}, "takes inputs of n: int64[2] each, got float64 values"),
        (
            {"a": [1.0], "n": [1, 2], "b": 0},
            'takes inputs {"a": float32[?], "n": int64[2]}; got unknown b',
        ),
    ],
)
def test_the_worker_refuses_what_the_gateway_lets_through(
    served: KetchServer, triton: TritonServer, item: Any, message: str
) -> None:
    response = served.predict("two_io", {"input": item})
    assert response.status_code == 400, response.text
    assert f"Triton model 'two_io' at {triton.http} (http) {message}" in response.json()["error"]
    good = {"a": [1.0], "n": [1, 2]}
    assert served.predict("two_io", {"input": good}).status_code == 200  # it still serves


def test_the_runtime_checks_items_itself_before_the_gateway_knows_the_tensors(
    triton: TritonServer,
) -> None:
    runtime = TritonRuntime(None, {"url": triton.http, "model": "two_io", "timeout_s": 10})
    try:
        good = {"a": [1.0, 2.0], "n": [3, 4]}
        assert runtime.predict([good]) == [{"total": [3.0], "doubled": [6, 8]}]
        for item, message in [
            ([1.0, 2.0], 'takes several inputs: send each input as {"a": float32[?], "n": '),
            ({"a": [1.0]}, "got no n"),
            ({"a": [[1.0]], "n": [1, 2]}, "takes inputs of a: float32[?] each, got shape [1, 1]"),
            ({"a": ["x"], "n": [1, 2]}, "takes inputs of a: float32[?] each, got strings"),
            ({"a": [1.0], "n": [True, False]}, "n: int64[2] each, got bool values"),
            (
                {"a": [1.0], "n": [2**63, 2**63]},
                "n: int64[2] each, got values outside int64's range",
            ),
        ]:
            with pytest.raises(BatchInputError, match=re.escape(message)):
                runtime.predict([good, item])
    finally:
        runtime.close()  # else Triton waits for the connection when it stops


def test_a_failure_inside_triton_is_a_500_naming_the_server_and_model(
    served: KetchServer, triton: TritonServer
) -> None:
    response = served.predict("two_io", {"input": {"a": [1.0], "n": [REFUSED, 1]}})
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert f"TritonError: Triton model 'two_io' at {triton.http} (http)" in error
    assert f"n={REFUSED} is refused by the model" in error
    assert answer(served, "two_io", [{"a": [1.0], "n": [1, 1]}]) == [
        {"total": [1.0], "doubled": [2, 2]}
    ]


def test_concurrent_requests_are_batched_and_answered_right(
    served: KetchServer, triton: TritonServer
) -> None:
    items = rows(48, seed=3)
    expected = affine_directly(triton, items)
    inferred, executions = triton.executions("affine")
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda x: served.predict("affine", {"input": x}), items))
    assert [r.status_code for r in responses] == [200] * len(items)
    # Batches of other sizes than the direct calls' may differ in the last bit (BLAS kernels).
    got = np.float32([r.json()["output"] for r in responses])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    now_inferred, now_executions = triton.executions("affine")
    assert now_inferred - inferred == len(items)
    # One worker sends one call at a time: fewer calls than requests means ketch batched them.
    assert now_executions - executions < len(items)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("ghost", r"Triton model 'ghost' at {http} \(http\) is not ready after 0\.2 s"),
        (
            "offline",
            r"Triton model 'affine' at 127\.0\.0\.1:\d+ \(http\) is not ready after 0\.2 s: "
            r"cannot reach the server \(ConnectionRefusedError",
        ),
    ],
)
def test_a_model_the_server_cannot_serve_is_a_503_naming_the_url_and_model(
    served: KetchServer, triton: TritonServer, model: str, message: str
) -> None:
    response = served.predict(model, {"input": [1.0, 2.0, 3.0]})
    assert response.status_code == 503, response.text
    assert re.search(message.format(http=re.escape(triton.http)), response.json()["error"])
    assert served.model_status(model)["state"] == "unhealthy"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ('url="localhost:8000", model="m", protocol="ftp"', "protocol must be 'http' or 'grpc'"),
        ('url="localhost:8000"', "the triton runtime needs model="),
        ('url="http://localhost:8000", model="m"', "url must be 'HOST:PORT' without a scheme"),
        ('path="localhost:8000", model="m"', "is not [http://|grpc://]HOST:PORT/MODEL"),
    ],
)
def test_bad_options_stop_the_start_with_exit_code_2(
    tmp_path: Path, options: str, message: str
) -> None:
    (tmp_path / "served.py").write_text(
        f'import ketch\n\nbad = ketch.deploy("bad", runtime="triton", {options})\n'
    )
    server = KetchServer(tmp_path / "served.py")
    try:
        assert server.process.wait(60) == 2
        server.wait_for_stderr(
            re.escape("model 'bad' (runtime 'triton'): ") + ".*" + re.escape(message)
        )
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("artifact", "options", "expected"),
    [
        ("h:8000/m", {}, {"url": "h:8000", "model": "m", "protocol": "http", "model_version": ""}),
        (
            "grpc://h:8001/m/3",
            {},
            {"url": "h:8001", "model": "m", "protocol": "grpc", "model_version": "3"},
        ),
        (
            None,
            {"url": "[::1]:8000", "model": "m", "model_version": 2, "timeout_s": 5},
            {"url": "[::1]:8000", "model_version": "2", "timeout_s": 5.0},
        ),
    ],
)
def test_options_are_checked_and_filled_without_a_server(
    artifact: str | None, options: dict[str, Any], expected: dict[str, Any]
) -> None:
    checked = TritonRuntime.check(artifact, options)
    assert {key: checked[key] for key in expected} == expected


@pytest.mark.parametrize(
    ("artifact", "options", "message"),
    [
        ("h:8000/m", {"model": "other"}, "says model='m' but the options say model='other'"),
        (None, {"url": "h:0", "model": "m"}, "url must be 'HOST:PORT'"),
        (None, {"url": "h:1", "model": "m", "model_version": "latest"}, "model_version must be"),
        (None, {"url": "h:1", "model": "m", "timeout_s": 0}, "timeout_s must be a number"),
        (None, {"url": "h:1", "model": "m", "device": "cuda"}, "unknown option(s) device"),
    ],
)
def test_bad_options_are_refused_naming_the_option(
    artifact: str | None, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TritonRuntime.check(artifact, options)


class IndexOnlyClient:
    """A client whose repository index says ``index`` (or raises it)."""

    def __init__(self, index: list[dict[str, str]] | Exception) -> None:
        self.index = index

    def get_model_repository_index(self) -> list[dict[str, str]]:
        if isinstance(self.index, Exception):
            raise self.index
        return self.index


@pytest.mark.parametrize(
    ("index", "hopeless"),
    [
        (InferenceServerException("[403] This API is restricted"), None),
        ([], None),  # PyTriton's: its models are not in the repository
        ([{"name": "m", "state": "LOADING"}], None),
        ([{"name": "m", "state": "UNAVAILABLE", "reason": "unloaded"}], None),
        ([{"name": "other", "state": "READY"}], "the server has no such model (it has: other)"),
        (
            [{"name": "m", "state": "UNAVAILABLE", "reason": "onnx file is corrupt"}],
            "the model failed to load on the server: onnx file is corrupt",
        ),
    ],
)
def test_only_a_missing_or_broken_model_stops_the_wait_at_once(
    index: list[dict[str, str]] | Exception, hopeless: str | None
) -> None:
    # A real Triton lists its repository; PyTriton's (above) does not, so this is checked on
    # the runtime's reading of an index alone.
    runtime = TritonRuntime.__new__(TritonRuntime)
    runtime.model, runtime.model_version, runtime.protocol = "m", "", "http"
    runtime._server_error = InferenceServerException
    _, got = runtime._why_not_ready(IndexOnlyClient(index), 1.0)
    assert got == hopeless
