"""The torch runtime against real PyTorch: tiny models the test builds and saves (a
torch.export archive, a TorchScript file, a factory), served through ketch over HTTP and
compared with torch's own answers."""

from __future__ import annotations

import re
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import KetchServer

ROWS = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [0.0, 0.0, 0.0]]

FACTORY = """
import torch


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = torch.nn.Linear(3, 4)
        self.score = torch.nn.Linear(4, 1)

    def forward(self, x):
        hidden = torch.relu(self.body(x))
        return self.score(hidden).squeeze(1), hidden.argmax(dim=1)


def build():
    return TwoHeads()


def build_bf16():
    torch.manual_seed(2)
    return torch.nn.Linear(3, 2).to(torch.bfloat16).eval()
"""

SERVED = """
import ketch

exported = ketch.deploy(
    "exported", runtime="torch", path="tiny.pt2", max_batch_size=16, min_replicas=1
)
scripted = ketch.deploy("scripted", runtime="torch", path="tiny.pt", input_shape=[3])
heads = ketch.deploy("heads", runtime="torch", path="heads.py:build", device="cpu")
brain = ketch.deploy("brain", runtime="torch", path="heads.py:build_bf16", input_dtype="bfloat16")
"""


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("torch")
    model = tiny_model()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(4, 3),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "tiny.pt2"))
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but users still have such files.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(model), str(folder / "tiny.pt"))
    (folder / "heads.py").write_text(textwrap.dedent(FACTORY))
    (folder / "served.py").write_text(SERVED)
    (folder / "broken.pt2").write_text("this is not a model")
    return folder


@pytest.fixture(scope="module")
def served(folder: Path) -> Iterator[KetchServer]:
    server = KetchServer(folder / "served.py")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def expected(rows: list[list[float]]) -> np.ndarray:
    with torch.inference_mode():
        return tiny_model()(torch.tensor(rows)).numpy()


def outputs(server: KetchServer, model: str, rows: Any) -> Any:
    response = server.predict(model, {"inputs": rows})
    assert response.status_code == 200, response.text
    return response.json()["outputs"]


@pytest.mark.parametrize("model", ["exported", "scripted"])
def test_saved_models_answer_as_torch_does(served: KetchServer, model: str) -> None:
    np.testing.assert_allclose(outputs(served, model, ROWS), expected(ROWS), rtol=1e-5, atol=1e-6)
    single = served.predict(model, {"input": ROWS[0]}).json()["output"]
    np.testing.assert_allclose(single, expected(ROWS[:1])[0], rtol=1e-5, atol=1e-6)


def test_factory_model_with_two_outputs_answers_one_pair_per_input(
    served: KetchServer, folder: Path
) -> None:
    namespace: dict[str, Any] = {}
    exec((folder / "heads.py").read_text(), namespace)
    with torch.inference_mode():
        score, index = namespace["build"]().eval()(torch.tensor(ROWS))
    answers = outputs(served, "heads", ROWS)
    assert [a[1] for a in answers] == index.tolist()
    np.testing.assert_allclose([a[0] for a in answers], score.numpy(), rtol=1e-5, atol=1e-6)


def test_concurrent_requests_are_stacked_into_batches_with_the_same_answers(
    served: KetchServer,
) -> None:
    rows = np.random.default_rng(3).normal(size=(40, 3)).round(3).tolist()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda row: served.predict("exported", {"input": row}), rows))
    assert all(a.status_code == 200 for a in answers)
    got = [a.json()["output"] for a in answers]
    np.testing.assert_allclose(got, expected(rows), rtol=1e-5, atol=1e-6)


def test_the_gateway_shows_the_tensors_the_archive_declares(served: KetchServer) -> None:
    outputs(served, "exported", ROWS)
    status = served.model_status("exported")
    assert status["runtime"] == "torch"
    assert status["artifact"].endswith("tiny.pt2")
    assert status["inputs"] == [{"name": "input", "datatype": "float32", "shape": [3]}]
    assert status["runtime_info"] == {"format": "torch.export", "device": "cpu"}


@pytest.mark.parametrize("model", ["exported", "scripted"])
def test_a_request_of_the_wrong_shape_is_a_400_naming_the_expected_one(
    served: KetchServer, model: str
) -> None:
    outputs(served, model, ROWS)  # a worker has announced the shape
    response = served.predict(model, {"inputs": [[1.0, 2.0, 3.0, 4.0]]})
    assert response.status_code == 400
    body = response.json()
    assert "takes inputs of input: float32[3] each, got" in body["error"]
    assert body["expected"] == {"shape": [3], "datatype": "float32"}
    assert served.predict(model, {"inputs": [["a", "b", "c"]]}).status_code == 400
    np.testing.assert_allclose(outputs(served, model, ROWS), expected(ROWS), rtol=1e-5, atol=1e-6)


def test_the_command_line_serves_an_archive_without_a_served_file(folder: Path) -> None:
    server = KetchServer(None, "--model", f"cli=torch:{folder / 'tiny.pt2'}")
    try:
        server.wait_ready()
        np.testing.assert_allclose(
            outputs(server, "cli", ROWS), expected(ROWS), rtol=1e-5, atol=1e-6
        )
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("missing=torch:nowhere.pt2", "model 'missing' (runtime 'torch'): no saved model at"),
        ("typo=tourch:tiny.pt2", "no runtime named 'tourch'; installed runtimes: "),
        ("noruntime:tiny.pt2", "is not NAME=RUNTIME:PATH"),
    ],
)
def test_bad_model_arguments_stop_the_start_naming_the_problem(
    folder: Path, argument: str, message: str
) -> None:
    server = KetchServer(None, "--model", argument, cwd=folder)
    try:
        assert server.process.wait(60) == 2
        server.wait_for_stderr(re.escape(message))
    finally:
        server.stop()


def test_an_artifact_in_the_wrong_format_is_reported_with_its_path_and_reason(
    folder: Path,
) -> None:
    server = KetchServer(None, "--model", "broken=torch:broken.pt2", cwd=folder)
    try:
        server.wait_ready()
        # The request waits while workers fail to load: until the model is marked unhealthy
        # (five failed starts, each importing torch) or its cold-start deadline (60 s) passes.
        response = server.client.post(
            "/models/broken/predict", json={"input": [1.0, 2.0, 3.0]}, timeout=150
        )
        assert response.status_code == 503
        error = response.json()["error"]
        assert "broken.pt2" in error
        assert "not a torch.export archive" in error and "not a TorchScript file" in error
    finally:
        server.stop()


def test_a_new_version_added_and_rolled_to_live_answers_as_its_archive(folder: Path) -> None:
    torch.manual_seed(7)
    retrained = torch.nn.Sequential(torch.nn.Linear(3, 2)).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(retrained, (torch.randn(4, 3),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "retrained.pt2"))
    with torch.inference_mode():
        want = retrained(torch.tensor(ROWS)).numpy()
    headers = {"Authorization": "Bearer torch-admin"}
    server = KetchServer(
        None, "--model", f"live=torch:{folder / 'tiny.pt2'}", "--admin-token", "torch-admin"
    )
    try:
        server.wait_ready()
        body = {
            "name": "live",
            "runtime": "torch",
            "path": str(folder / "retrained.pt2"),
            "version": "2",
        }
        added = server.client.post("/admin/models", json=body, headers=headers)
        assert added.status_code == 201, added.text
        assert added.json()["default_version"] == "1"
        np.testing.assert_allclose(
            outputs(server, "live", ROWS), expected(ROWS), rtol=1e-5, atol=1e-6
        )

        rolled = server.client.post(
            "/admin/models/live/roll", json={"version": "2"}, headers=headers
        )
        assert rolled.status_code == 200, rolled.text
        np.testing.assert_allclose(outputs(server, "live", ROWS), want, rtol=1e-5, atol=1e-6)
        assert server.model_status("live", "2")["runtime_info"] == {
            "format": "torch.export",
            "device": "cpu",
        }
    finally:
        server.stop()


def test_bfloat16_tensors_reach_torch_and_come_back(served: KetchServer) -> None:
    import ml_dtypes
    import tritonclient.http as triton

    rows = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]], dtype=ml_dtypes.bfloat16)
    client = triton.InferenceServerClient(url=served.url.removeprefix("http://"))
    try:
        tensor = triton.InferInput("input_0", [2, 3], "BF16")
        tensor.set_data_from_numpy(rows)
        result = client.infer("brain", [tensor])
    finally:
        client.close()
    (output,) = result.get_response()["outputs"]
    assert output["datatype"] == "BF16"
    got = result.as_numpy(output["name"])
    assert got is not None
    torch.manual_seed(2)
    model = torch.nn.Linear(3, 2).to(torch.bfloat16).eval()
    with torch.inference_mode():
        want = model(torch.tensor(rows.astype(np.float32)).to(torch.bfloat16)).float().numpy()
    np.testing.assert_array_equal(got.astype(np.float32), want)
