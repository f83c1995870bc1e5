"""Triton's model repository extension (index, load, unload) with Triton's clients, over HTTP
and gRPC, against a real `ketch serve --model-control explicit`."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.conftest import KetchServer

MODELS = """
import ketch


@ketch.model(max_batch_size=4)
def double(xs: list[float]) -> list[float]:
    return [2 * x for x in xs]


@ketch.model(name="double", version=2, max_batch_size=4)
def double_v2(xs: list[float]) -> list[float]:
    return [2 * x for x in xs]


@ketch.model
def keep(xs: list[float]) -> list[float]:
    return xs
"""


def _write(folder: Path) -> Path:
    path = folder / "models.py"
    path.write_text(textwrap.dedent(MODELS))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KetchServer]:
    served = KetchServer(_write(tmp_path_factory.mktemp("repo")), "--model-control", "explicit")
    try:
        yield served.wait_ready()
    finally:
        served.stop()


def _infer(client: triton_http.InferenceServerClient, model: str) -> list[float]:
    x = triton_http.InferInput("input_0", [2], "FP64")
    x.set_data_from_numpy(np.array([1.0, 2.5]))
    output = client.infer(model, [x]).as_numpy("output_0")
    assert output is not None
    return list(output.tolist())


def test_unload_and_load_with_a_config_override(server: KetchServer) -> None:
    http = triton_http.InferenceServerClient(url=server.url.removeprefix("http://"))
    grpc = triton_grpc.InferenceServerClient(url=server.grpc)
    try:
        index = http.get_model_repository_index()
        assert {(m["name"], m["version"], m["state"]) for m in index} == {
            ("double", "1", "READY"),
            ("double", "2", "READY"),
            ("keep", "1", "READY"),
        }
        assert _infer(http, "double") == [2.0, 5.0]
        http.unload_model("double")
        assert not http.is_model_ready("double")
        assert not grpc.is_model_ready("double")  # known, unloaded: not ready (no NOT_FOUND)
        with pytest.raises(InferenceServerException) as gone:
            _infer(http, "double")
        assert "Request for unknown model" in gone.value.message()
        assert _infer(http, "keep") == [1.0, 2.5]  # the others serve on
        unloaded = {
            (m.name, m.version, m.state, m.reason)
            for m in grpc.get_model_repository_index().models
            if m.name == "double"
        }
        assert unloaded == {
            ("double", "1", "UNAVAILABLE", "unloaded"),
            ("double", "2", "UNAVAILABLE", "unloaded"),
        }
        # Back over gRPC, with a new batch size: both versions, the same default.
        grpc.load_model("double", config=json.dumps({"max_batch_size": 16}))
        assert http.is_model_ready("double")
        assert _infer(http, "double") == [2.0, 5.0]
        assert http.get_model_config("double")["max_batch_size"] == 16
        assert http.get_model_metadata("double")["versions"] == ["1", "2"]
        # Loading a served model with an override serves it anew; without one, nothing moves.
        http.load_model("double", config=json.dumps({"min_replicas": 1, "max_delay_ms": 2}))
        config = http.get_model_config("double")
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
        http.load_model("keep")
        assert _infer(http, "keep") == [1.0, 2.5]
        with pytest.raises(InferenceServerException) as bad:
            http.load_model("double", config=json.dumps({"backend": "onnx"}))
        assert "ketch cannot change" in bad.value.message()
        assert "failed to load 'double'" in bad.value.message()  # Triton's clients look for it
        # Numbers as text, as protobuf's JSON writes 64-bit integers.
        http.load_model("double", config=json.dumps({"max_batch_size": "8"}))
        assert http.get_model_config("double")["max_batch_size"] == 8
        with pytest.raises(InferenceServerException) as files:
            http.load_model("double", config="{}", files={"file:1/model.py": b"x"})
        assert "takes no model files" in files.value.message()
        assert files.value.status() == "500"  # as Triton answers it (gRPC: INTERNAL)
        with pytest.raises(InferenceServerException) as unknown:
            grpc.unload_model("nope")
        assert unknown.value.status() == "StatusCode.NOT_FOUND"
    finally:
        http.close()
        grpc.close()


def test_without_explicit_model_control_load_and_unload_are_refused(tmp_path: Path) -> None:
    served = KetchServer(_write(tmp_path)).wait_ready()
    http = triton_http.InferenceServerClient(url=served.url.removeprefix("http://"))
    try:
        assert len(http.get_model_repository_index()) == 3  # the index is always there
        with pytest.raises(InferenceServerException) as refused:
            http.unload_model("double")
        assert "--model-control explicit" in refused.value.message()
        assert _infer(http, "double") == [2.0, 5.0]
    finally:
        http.close()
        served.stop()
