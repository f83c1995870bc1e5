"""Triton's system shared memory extension against a real `ketch serve`, with tritonclient's
own shared memory utilities making the POSIX regions: inputs read from them and outputs written
into them over REST and gRPC, registration errors that say what was wrong, CUDA refused."""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from tests.conftest import KetchServer

MODELS = """
import mmap

import numpy as np

import ketch
from ketch import TensorSpec


@ketch.model(
    inputs=[TensorSpec("x", "float32", (4,))],
    outputs=[TensorSpec("y", "float32", (4,))],
    max_batch_size=8,
)
def scale(batch: np.ndarray) -> np.ndarray:
    return batch * 2


@ketch.model(
    inputs=[TensorSpec("a", "int32", (2,))],
    outputs=[TensorSpec("total", "int32", ()), TensorSpec("text", "str", ())],
)
def describe(items: list[list[int]]) -> list[dict]:
    return [{"total": sum(a), "text": f"sum {sum(a)}"} for a in items]


@ketch.model(
    inputs=[TensorSpec("x", "float32", (4,))], outputs=[TensorSpec("in_place", "bool", ())]
)
def where(batch: np.ndarray) -> list[bool]:
    # Whether the batch's bytes lie in a mapping of shared memory, not in a message.
    base = batch
    while getattr(base, "base", None) is not None:
        base = base.base
    owner = base.obj if isinstance(base, memoryview) else base
    return [isinstance(owner, mmap.mmap)] * len(batch)


@ketch.model(inputs=[TensorSpec("blob", "bytes", ())], outputs=[TensorSpec("back", "bytes", ())])
def reverse(blobs: list[bytes]) -> list[bytes]:
    return [blob[::-1] for blob in blobs]
"""

Protocol = Any  # tritonclient.http or tritonclient.grpc: the same calls, module by module


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KetchServer]:
    path = tmp_path_factory.mktemp("shm") / "models.py"
    path.write_text(textwrap.dedent(MODELS))
    served = KetchServer(path)
    try:
        yield served.wait_ready()
    finally:
        served.stop()


class Regions:
    """POSIX shared memory regions a test makes, destroyed (and unregistered) after it."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def make(self, byte_size: int) -> tuple[str, str, Any]:
        name = f"r-{uuid.uuid4().hex[:8]}"
        key = f"/ketch-test-{name}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        self.handles.append(handle)
        return name, key, handle

    def destroy(self) -> None:
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)


@pytest.fixture
def regions() -> Iterator[Regions]:
    made = Regions()
    try:
        yield made
    finally:
        made.destroy()


@pytest.fixture(params=["http", "grpc"])
def protocol(request: pytest.FixtureRequest, server: KetchServer) -> Iterator[tuple[Any, Any]]:
    """A client of each protocol, and its module; every region unregistered after."""
    if request.param == "http":
        module: Any = triton_http
        client: Any = triton_http.InferenceServerClient(url=server.url.removeprefix("http://"))
    else:
        module = triton_grpc
        client = triton_grpc.InferenceServerClient(url=server.grpc)
    try:
        yield module, client
    finally:
        client.unregister_system_shared_memory()
        client.close()


def test_inputs_and_outputs_through_shared_memory(
    protocol: tuple[Any, Any], regions: Regions
) -> None:
    module, client = protocol
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    in_name, in_key, in_handle = regions.make(x.nbytes + 16)
    out_name, out_key, out_handle = regions.make(x.nbytes)
    shm.set_shared_memory_region(in_handle, [x], offset=16)
    client.register_system_shared_memory(in_name, in_key, x.nbytes + 16)
    client.register_system_shared_memory(out_name, out_key, x.nbytes)

    given = module.InferInput("x", [3, 4], "FP32")
    given.set_shared_memory(in_name, x.nbytes, offset=16)
    wanted = module.InferRequestedOutput("y")
    wanted.set_shared_memory(out_name, x.nbytes)
    result = client.infer("scale", [given], outputs=[wanted])

    output = result.get_output("y")
    shape = output["shape"] if isinstance(output, dict) else list(output.shape)
    assert [int(d) for d in shape] == [3, 4]
    written = shm.get_contents_as_numpy(out_handle, np.float32, [3, 4])
    np.testing.assert_array_equal(written, x * 2)

    assert _registered(client) == {in_name: (in_key, x.nbytes + 16), out_name: (out_key, x.nbytes)}
    client.unregister_system_shared_memory(in_name)
    assert set(_registered(client)) == {out_name}


def _registered(client: Any) -> dict[str, tuple[str, int]]:
    """The regions the server lists: name -> (key, byte_size), whichever the protocol."""
    if isinstance(client, triton_http.InferenceServerClient):
        listed = client.get_system_shared_memory_status()
        return {r["name"]: (r["key"], r["byte_size"]) for r in listed}
    regions = client.get_system_shared_memory_status(as_json=True).get("regions", {})
    return {n: (r["key"], int(r["byte_size"])) for n, r in regions.items()}


def test_a_local_worker_reads_the_input_where_it_lies(
    protocol: tuple[Any, Any], regions: Regions
) -> None:
    """The worker maps the client's region itself: the model's batch is a view of it. The
    same tensor sent in the request reaches the model as the bytes of a message."""
    module, client = protocol
    x = np.full((2, 4), 1.5, dtype=np.float32)
    name, key, handle = regions.make(x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    client.register_system_shared_memory(name, key, x.nbytes)
    placed = module.InferInput("x", [2, 4], "FP32")
    placed.set_shared_memory(name, x.nbytes)
    assert client.infer("where", [placed]).as_numpy("in_place").tolist() == [True, True]
    sent = module.InferInput("x", [2, 4], "FP32")
    sent.set_data_from_numpy(x)
    assert client.infer("where", [sent]).as_numpy("in_place").tolist() == [False, False]
    # The client removes the object while it is registered: the worker says it is gone.
    shm.destroy_shared_memory_region(handle)
    regions.handles.remove(handle)
    gone = _refused(lambda: client.infer("where", [placed]))
    assert f"shared memory object /{key.lstrip('/')} holding an input is gone" in gone
    assert client.infer("where", [sent]).as_numpy("in_place").tolist() == [False, False]


def test_one_output_in_shared_memory_the_other_in_the_answer(
    protocol: tuple[Any, Any], regions: Regions
) -> None:
    module, client = protocol
    out_name, out_key, out_handle = regions.make(64)
    client.register_system_shared_memory(out_name, out_key, 64)
    given = module.InferInput("a", [2, 2], "INT32")
    given.set_data_from_numpy(np.array([[1, 2], [30, 40]], dtype=np.int32))
    total = module.InferRequestedOutput("total")
    total.set_shared_memory(out_name, 8)
    text = module.InferRequestedOutput("text")
    result = client.infer("describe", [given], outputs=[total, text])
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.int32, [2]), [3, 70])
    assert result.as_numpy("text").tolist() == [b"sum 3", b"sum 70"]


def test_bytes_through_shared_memory(protocol: tuple[Any, Any], regions: Regions) -> None:
    module, client = protocol
    blobs = np.array([b"\xff\x00ab", b"", b"xyz"], dtype=np.object_)
    serialized = serialize_byte_tensor(blobs)
    raw = serialized.item()
    in_name, in_key, in_handle = regions.make(len(raw))
    out_name, out_key, out_handle = regions.make(len(raw))
    shm.set_shared_memory_region(in_handle, [serialized])
    client.register_system_shared_memory(in_name, in_key, len(raw))
    client.register_system_shared_memory(out_name, out_key, len(raw))
    given = module.InferInput("blob", [3], "BYTES")
    given.set_shared_memory(in_name, len(raw))
    back = module.InferRequestedOutput("back")
    back.set_shared_memory(out_name, len(raw))
    client.infer("reverse", [given], outputs=[back])
    answer = shm.get_contents_as_numpy(out_handle, np.object_, [3])
    assert answer.tolist() == [b"ba\x00\xff", b"", b"zyx"]


def _refused(call: Any) -> str:
    with pytest.raises(InferenceServerException) as refused:
        call()
    message: str = refused.value.message()
    return message


def test_what_registration_refuses(
    protocol: tuple[Any, Any], regions: Regions, server: KetchServer
) -> None:
    module, client = protocol
    name, key, _ = regions.make(32)
    missing = _refused(lambda: client.register_system_shared_memory("m", "/ketch-no-such", 8))
    assert "Unable to open shared memory region 'm'" in missing
    outside = _refused(lambda: client.register_system_shared_memory("p", "/../etc/passwd", 8))
    assert "is not a shared-memory object's name" in outside
    too_big = _refused(lambda: client.register_system_shared_memory(name, key, 64))
    assert "holds 32 bytes, fewer than offset 0 + byte_size 64" in too_big
    client.register_system_shared_memory(name, key, 32)
    twice = _refused(lambda: client.register_system_shared_memory(name, key, 32))
    assert f"region {name!r} is registered already" in twice

    given = module.InferInput("x", [1, 4], "FP32")
    given.set_shared_memory("never-registered", 16)
    unknown = _refused(lambda: client.infer("scale", [given]))
    assert "Unable to find shared memory region: 'never-registered'" in unknown
    past = module.InferInput("x", [1, 4], "FP32")
    past.set_shared_memory(name, 16, offset=24)
    assert "runs past the end of shared memory region" in _refused(
        lambda: client.infer("scale", [past])
    )
    small = module.InferInput("x", [2, 4], "FP32")
    small.set_data_from_numpy(np.ones((2, 4), dtype=np.float32))
    out = module.InferRequestedOutput("y")
    out.set_shared_memory(name, 16)
    assert "output 'y' takes 32 bytes, more than the 16" in _refused(
        lambda: client.infer("scale", [small], outputs=[out])
    )
    # Still serving, and the region still answers.
    fine = module.InferInput("x", [1, 4], "FP32")
    fine.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    assert client.infer("scale", [fine]).as_numpy("y").tolist() == [[2.0] * 4]
    assert server.client.get("/v2/systemsharedmemory/status").status_code == 200


def test_cuda_shared_memory_is_refused(server: KetchServer) -> None:
    http = server.client
    answer = http.post(
        "/v2/cudasharedmemory/region/gpu/register",
        json={"raw_handle": {"b64": ""}, "device_id": 0, "byte_size": 8},
    )
    assert answer.status_code == 400
    assert "CUDA shared memory is not supported" in answer.json()["error"]
    assert http.get("/v2/cudasharedmemory/status").json() == []
    assert http.post("/v2/cudasharedmemory/unregister").status_code == 200
    client = triton_grpc.InferenceServerClient(url=server.grpc)
    try:
        client.unregister_cuda_shared_memory()  # what Triton's examples do first: no error
        with pytest.raises(InferenceServerException) as refused:
            client.register_cuda_shared_memory("gpu", b"", 0, 8)
        assert "CUDA shared memory is not supported" in refused.value.message()
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()
