"""The Open Inference Protocol spoken to by the KServe Python SDK's own asyncio clients
(``kserve.InferenceRESTClient`` and ``kserve.InferenceGRPCClient``, with its ``InferRequest``,
``InferInput`` and ``InferResponse``) against a real `ketch serve`.

The SDK's clients have no metadata calls: server and model metadata are read with the SDK's
generated gRPC stub and checked against the SDK's own REST data models.

These run in a pytest of their own (``tests/test_kserve_sdk.py`` starts it): the SDK's
generated protobuf module and tritonclient's define the same ``inference`` messages, which one
process's protobuf descriptor pool refuses to hold twice."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
from kserve import (
    InferenceGRPCClient,
    InferenceRESTClient,
    InferInput,
    InferRequest,
    InferResponse,
    RESTConfig,
)
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from kserve.protocol.rest.v2_datamodels import (
    ModelMetadataResponse,
    ServerMetadataResponse,
)

import ketch
from tests.conftest import KetchServer

MODELS = """
import numpy as np

import ketch
from ketch import TensorSpec


@ketch.model(
    inputs=[TensorSpec("x", "float32", (3,))],
    outputs=[TensorSpec("y", "float32", (3,))],
    max_batch_size=8,
)
def scale(batch: np.ndarray) -> np.ndarray:
    return batch * 2


@ketch.model
def shout(texts: list[str]) -> list[str]:
    return [text.upper() + "!" for text in texts]


@ketch.model
def tagged(texts: list[str], params: list[dict]) -> list[str]:
    return [f"{text}|{sorted(p.items())}" for text, p in zip(texts, params)]
"""

UNKNOWN = "Request for unknown model: 'nope' is not found"
WRONG_TYPE = "input 'x' of model 'scale:1' is FP32, got INT32"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KetchServer]:
    path = tmp_path_factory.mktemp("kserve_sdk") / "models.py"
    path.write_text(textwrap.dedent(MODELS))
    served = KetchServer(path)
    try:
        yield served.wait_ready()
    finally:
        served.stop()


def _rest() -> InferenceRESTClient:
    return InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))


def _grpc(server: KetchServer) -> InferenceGRPCClient:
    return InferenceGRPCClient(server.grpc, timeout=30)


def _fp32(array: np.ndarray, *, binary: bool = True, name: str = "x") -> InferInput:
    tensor = InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def _texts(name: str, texts: list[str], *, binary: bool = True) -> InferInput:
    tensor = InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=np.object_), binary_data=binary)
    return tensor


def _only_output(response: InferResponse) -> np.ndarray:
    (output,) = response.outputs
    values: np.ndarray = output.as_numpy()  # the SDK is untyped
    return values


def test_rest_health_and_model_readiness(server: KetchServer) -> None:
    async def scenario() -> None:
        async with _rest() as client:
            assert await client.is_server_live(server.url) is True
            assert await client.is_server_ready(server.url) is True
            assert await client.is_model_ready(server.url, "scale") is True
            assert await client.is_model_ready(server.url, "tagged") is True
            # V2 over REST: a model that is not there is simply not ready.
            assert await client.is_model_ready(server.url, "nope") is False

    asyncio.run(scenario())


def test_grpc_health_and_model_readiness(server: KetchServer) -> None:
    async def scenario() -> None:
        async with _grpc(server) as client:
            assert await client.is_server_live() is True
            assert await client.is_server_ready() is True
            assert await client.is_model_ready("scale") is True
            assert await client.is_model_ready("tagged") is True
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await client.is_model_ready("nope")
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            assert unknown.value.details() == UNKNOWN

    asyncio.run(scenario())


def test_rest_metadata_fits_the_sdk_data_models(server: KetchServer) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            answer = await http.get("/v2")
            assert answer.status_code == 200, answer.text
            meta = ServerMetadataResponse.model_validate(answer.json())
            assert (meta.name, meta.version) == ("ketch", ketch.__version__)
            assert "binary_tensor_data" in meta.extensions
            answer = await http.get("/v2/models/scale")
            assert answer.status_code == 200, answer.text
            model = ModelMetadataResponse.model_validate(answer.json())
        assert model.name == "scale"
        assert model.versions == ["1"]
        assert model.platform == "ketch_python"
        assert [(t.name, t.datatype, t.shape) for t in model.inputs] == [("x", "FP32", [-1, 3])]
        assert [(t.name, t.datatype, t.shape) for t in model.outputs] == [("y", "FP32", [-1, 3])]

    asyncio.run(scenario())


def test_grpc_metadata_through_the_sdk_stub(server: KetchServer) -> None:
    async def scenario() -> None:
        async with grpc.aio.insecure_channel(server.grpc) as channel:
            stub = GRPCInferenceServiceStub(channel)
            meta = await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30)
            assert (meta.name, meta.version) == ("ketch", ketch.__version__)
            assert "binary_tensor_data" in meta.extensions
            model = await stub.ModelMetadata(pb.ModelMetadataRequest(name="shout"), timeout=30)
            assert (model.name, list(model.versions), model.platform) == (
                "shout",
                ["1"],
                "ketch_python",
            )
            assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
                ("input_0", "BYTES", [-1])
            ]
            assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
                ("output_0", "BYTES", [-1])
            ]
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=30)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            assert unknown.value.details() == UNKNOWN

    asyncio.run(scenario())


def test_rest_infer_fp32_binary_json_and_concurrent(server: KetchServer) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)

    async def scenario() -> None:
        async with _rest() as client:
            # The SDK's default: the tensor as binary data after the JSON header.
            binary = await client.infer(
                server.url, InferRequest("scale", [_fp32(x)], request_id="r-1"), model_name="scale"
            )
            assert (binary.model_name, binary.id) == ("scale", "r-1")
            (output,) = binary.outputs
            assert (output.name, output.datatype, output.shape) == ("y", "FP32", [2, 3])
            np.testing.assert_array_equal(output.as_numpy(), x * 2)
            # As JSON numbers, and with the outputs asked for as binary data.
            as_json = InferRequest("scale", [_fp32(x, binary=False)])
            answered = await client.infer(server.url, as_json, model_name="scale")
            np.testing.assert_array_equal(_only_output(answered), x * 2)
            binary_out = InferRequest("scale", [_fp32(x)], parameters={"binary_data_output": True})
            answered = await client.infer(server.url, binary_out, model_name="scale")
            assert answered.outputs[0].datatype == "FP32"
            np.testing.assert_array_equal(_only_output(answered), x * 2)
            # Concurrent requests on one client each get their own answer.
            rows = [np.full((1, 3), i, dtype=np.float32) for i in range(6)]
            answers = await asyncio.gather(
                *(
                    client.infer(
                        server.url,
                        InferRequest("scale", [_fp32(row)], request_id=f"c-{i}"),
                        model_name="scale",
                    )
                    for i, row in enumerate(rows)
                )
            )
        assert [a.id for a in answers] == [f"c-{i}" for i in range(6)]
        for row, answer in zip(rows, answers, strict=True):
            np.testing.assert_array_equal(_only_output(answer), row * 2)

    asyncio.run(scenario())


def test_grpc_infer_fp32_raw_contents_and_concurrent(server: KetchServer) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)

    async def scenario() -> None:
        async with _grpc(server) as client:
            # The SDK's default: raw_input_contents.
            raw = await client.infer(InferRequest("scale", [_fp32(x)], request_id="g-1"))
            assert (raw.model_name, raw.model_version, raw.id) == ("scale", "1", "g-1")
            (output,) = raw.outputs
            assert (output.name, output.datatype, output.shape) == ("y", "FP32", [2, 3])
            np.testing.assert_array_equal(output.as_numpy(), x * 2)
            # As typed contents (fp32_contents), from a plain list.
            listed = InferInput("x", [2, 3], "FP32", data=x.ravel().tolist())
            answered = await client.infer(InferRequest("scale", [listed]))
            np.testing.assert_array_equal(_only_output(answered), x * 2)
            rows = [np.full((1, 3), i, dtype=np.float32) for i in range(6)]
            answers = await asyncio.gather(
                *(
                    client.infer(InferRequest("scale", [_fp32(row)], request_id=f"c-{i}"))
                    for i, row in enumerate(rows)
                )
            )
        assert [a.id for a in answers] == [f"c-{i}" for i in range(6)]
        for row, answer in zip(rows, answers, strict=True):
            np.testing.assert_array_equal(_only_output(answer), row * 2)

    asyncio.run(scenario())


def test_rest_bytes_model(server: KetchServer) -> None:
    async def scenario() -> None:
        async with _rest() as client:
            for binary in (True, False):
                request = InferRequest("shout", [_texts("input_0", ["é", "b"], binary=binary)])
                answered = await client.infer(server.url, request, model_name="shout")
                (output,) = answered.outputs
                assert (output.name, output.datatype, output.shape) == ("output_0", "BYTES", [2])
                assert _only_output(answered).tolist() == ["É!", "B!"]

    asyncio.run(scenario())


def test_grpc_bytes_model(server: KetchServer) -> None:
    async def scenario() -> None:
        async with _grpc(server) as client:
            raw = InferRequest("shout", [_texts("input_0", ["é", "b"])])
            listed = InferRequest("shout", [InferInput("input_0", [2], "BYTES", data=["é", "b"])])
            for request in (raw, listed):
                answered = await client.infer(request)
                (output,) = answered.outputs
                assert (output.name, output.datatype, output.shape) == ("output_0", "BYTES", [2])
                assert _only_output(answered).tolist() == ["É!".encode(), b"B!"]

    asyncio.run(scenario())


def test_rest_request_parameters_reach_a_model_that_takes_them(server: KetchServer) -> None:
    async def scenario() -> None:
        async with _rest() as client:
            request = InferRequest(
                "tagged",
                [_texts("input_0", ["a", "b"])],
                parameters={"lang": "fr", "n": 3, "strict": True},
            )
            answered = await client.infer(server.url, request, model_name="tagged")
            assert _only_output(answered).tolist() == [
                "a|[('lang', 'fr'), ('n', 3), ('strict', True)]",
                "b|[('lang', 'fr'), ('n', 3), ('strict', True)]",
            ]
            # A model that takes no parameters refuses them, naming them.
            refused_request = InferRequest(
                "shout", [_texts("input_0", ["x"])], parameters={"my_param": 1}
            )
            with pytest.raises(httpx.HTTPStatusError) as refused:
                await client.infer(server.url, refused_request, model_name="shout")
        assert refused.value.response.status_code == 400
        assert "takes no request parameters, got ['my_param']" in str(refused.value)

    asyncio.run(scenario())


def test_grpc_request_parameters_reach_a_model_that_takes_them(server: KetchServer) -> None:
    async def scenario() -> None:
        async with _grpc(server) as client:
            request = InferRequest(
                "tagged",
                [_texts("input_0", ["a", "b"])],
                parameters={"lang": "fr", "n": 3, "strict": True},
            )
            answered = await client.infer(request)
            assert _only_output(answered).tolist() == [
                b"a|[('lang', 'fr'), ('n', 3), ('strict', True)]",
                b"b|[('lang', 'fr'), ('n', 3), ('strict', True)]",
            ]
            refused_request = InferRequest(
                "shout", [_texts("input_0", ["x"])], parameters={"my_param": 1}
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.infer(refused_request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "takes no request parameters, got ['my_param']" in str(refused.value.details())

    asyncio.run(scenario())


def test_rest_errors_carry_ketchs_message(server: KetchServer) -> None:
    one = np.ones((1, 3), dtype=np.float32)
    wrong_type = InferInput("x", [1, 3], "INT32")
    wrong_type.set_data_from_numpy(np.ones((1, 3), dtype=np.int32))

    async def scenario() -> None:
        async with _rest() as client:
            with pytest.raises(httpx.HTTPStatusError) as unknown:
                await client.infer(
                    server.url, InferRequest("nope", [_fp32(one)]), model_name="nope"
                )
            assert unknown.value.response.status_code == 404
            # The SDK lifts ketch's "error" into its own message.
            assert str(unknown.value).startswith(f"{UNKNOWN}, '404")
            with pytest.raises(httpx.HTTPStatusError) as refused:
                await client.infer(
                    server.url, InferRequest("scale", [wrong_type]), model_name="scale"
                )
            assert refused.value.response.status_code == 400
            assert str(refused.value).startswith(f"{WRONG_TYPE}, '400")
            # Nothing lost: the same client still infers.
            answered = await client.infer(
                server.url, InferRequest("scale", [_fp32(one)]), model_name="scale"
            )
            np.testing.assert_array_equal(_only_output(answered), one * 2)

    asyncio.run(scenario())


def test_grpc_errors_carry_ketchs_message(server: KetchServer) -> None:
    one = np.ones((1, 3), dtype=np.float32)
    wrong_type = InferInput("x", [1, 3], "INT32")
    wrong_type.set_data_from_numpy(np.ones((1, 3), dtype=np.int32))

    async def scenario() -> None:
        async with _grpc(server) as client:
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await client.infer(InferRequest("nope", [_fp32(one)]))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            assert unknown.value.details() == UNKNOWN
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.infer(InferRequest("scale", [wrong_type]))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == WRONG_TYPE
            answered = await client.infer(InferRequest("scale", [_fp32(one)]))
            np.testing.assert_array_equal(_only_output(answered), one * 2)

    asyncio.run(scenario())
