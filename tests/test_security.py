"""Who may be a worker: CURVE on the broker, as `ketch serve`, `ketch worker` and
`ketch keygen` set it up, tried with real processes on loopback."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from ketch.zmq_transport.protocol import PROTOCOL, Command, decode, encode
from ketch.zmq_transport.security import WorkerKeys
from tests.conftest import START_DEADLINE_S, KetchProcess, KetchServer

StartServer = Callable[..., KetchServer]
StartWorker = Callable[..., KetchProcess]
WriteModels = Callable[..., Path]

SERVED = """
    import ketch

    @ketch.model
    def double(xs):
        return [2 * x for x in xs]
"""

ROGUE = """
    import ketch

    @ketch.model(name="triple", version="3")
    def triple(xs):
        return [3 * x for x in xs]
"""


def keygen(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ketch.cli.main", "keygen", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keygen_writes_private_secrets_and_authorizes_its_worker_key(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    assert keygen(folder).returncode == 0
    names = {path.name for path in folder.iterdir()}
    assert names == {
        "server.key",
        "server.key_secret",
        "worker.key",
        "worker.key_secret",
        "authorized",
    }
    assert [path.name for path in (folder / "authorized").iterdir()] == ["worker.key"]
    for secret in ("server.key_secret", "worker.key_secret"):
        assert stat.S_IMODE((folder / secret).stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    # Keys already there are never overwritten.
    again = keygen(folder)
    assert again.returncode == 2 and "not overwriting keys" in again.stderr


def test_a_worker_without_keys_is_told_what_it_needs(
    start_worker: StartWorker, write_models: WriteModels
) -> None:
    worker = start_worker(f"{write_models(ROGUE)}:triple", "tcp://127.0.0.1:9")
    assert worker.process.wait(60) == 2
    worker.stop()
    assert any("needs CURVE keys: --broker-keys DIR" in line for line in worker.stderr_lines)


def test_an_insecure_worker_is_refused_and_the_gateway_keeps_serving(
    start_server: StartServer, start_worker: StartWorker, write_models: WriteModels
) -> None:
    server = start_server(write_models(SERVED))
    rogue = start_worker(
        f"{write_models(ROGUE, 'rogue.py')}:triple", server.broker, "--insecure-broker"
    )
    # ZeroMQ mostly tells a mechanism mismatch; at times only that the handshake failed.
    server.wait_for(
        r"refused a worker connection from .*: "
        r"(it does not speak CURVE|its ZeroMQ handshake failed)"
    )
    assert any("without CURVE" in line for line in rogue.stderr_lines)
    assert server.predict("triple", {"input": 1}).status_code == 404
    assert server.predict("double", {"input": 21}).json()["output"] == 42
    metrics = server.client.get("/metrics").text
    refused = [
        line for line in metrics.splitlines() if line.startswith("ketch_broker_refused_total")
    ]
    assert refused and float(refused[0].split()[-1]) >= 1


def test_an_unauthorized_key_is_refused_until_it_is_put_in_the_authorized_folder(
    start_server: StartServer,
    start_worker: StartWorker,
    write_models: WriteModels,
    broker_keys: Path,
    tmp_path: Path,
) -> None:
    other = tmp_path / "other"
    assert keygen(other).returncode == 0
    authorized = tmp_path / "gateway"
    shutil.copytree(broker_keys, authorized)
    models = write_models(SERVED)
    server = start_server(models, "--broker-keys", str(authorized))
    stranger = start_worker(
        f"{models}:double",
        server.broker,
        "--server-key",
        str(authorized / "server.key"),
        "--key",
        str(other / "worker.key_secret"),
    )
    public = (other / "worker.key").read_text().split('public-key = "')[1].split('"')[0]
    server.wait_for(
        rf"refused a worker connection from 127\.0\.0\.1 with key {re.escape(public)}: "
        "its key is not among the authorized worker keys"
    )
    stranger.wait_for_stderr(r"refused this worker: this worker's public key is not among")
    assert server.model_status("double")["replicas"]["ready"] == 0

    # The folder is read again when it changes: no restart needed.
    shutil.copyfile(other / "worker.key", authorized / "authorized" / "other.key")
    server.wait_for(rf"model double:1 ready: worker pid {stranger.process.pid} ")
    assert server.predict("double", {"input": 2}).json()["output"] == 4


def test_a_worker_that_does_not_know_the_brokers_key_is_refused(
    start_server: StartServer, start_worker: StartWorker, write_models: WriteModels, tmp_path: Path
) -> None:
    # The gateway made its keys at start; these are another gateway's.
    other = tmp_path / "other"
    assert keygen(other).returncode == 0
    server = start_server(write_models(SERVED))
    start_worker(
        f"{write_models(ROGUE, 'rogue.py')}:triple", server.broker, "--broker-keys", str(other)
    )
    server.wait_for(r"refused a worker connection from .*: its CURVE handshake failed")
    assert server.predict("triple", {"input": 1}).status_code == 404


def test_an_insecure_broker_says_so_and_admits_a_worker_without_keys(
    start_server: StartServer, start_worker: StartWorker, write_models: WriteModels
) -> None:
    models = write_models(SERVED)
    server = start_server(models, "--insecure-broker")
    assert any("INSECURE BROKER" in line for line in server.stderr_lines)
    worker = start_worker(f"{models}:double", server.broker, "--insecure-broker")
    server.wait_for(rf"model double:1 ready: worker pid {worker.process.pid} ")
    assert server.predict("double", {"input": 3}).json()["output"] == 6


@dataclass(frozen=True)
class Namespace:
    """A network namespace joined to this one by a veth pair: ``host`` is this side's
    address, ``peer`` the namespace's; ``run`` prefixes a command to run it inside."""

    name: str
    host: str
    peer: str

    @property
    def run(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def network_namespace() -> Iterator[Namespace]:
    """A namespace with its own network stack, reachable only over a veth pair made here;
    removed afterwards (removing it removes the pair). Skipped, saying why, where the
    machine does not let this process make one (not root, no iproute2, no CAP_NET_ADMIN)."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces: the `ip` command (iproute2) is not installed")
    tag = f"{os.getpid() % 10000}{secrets.token_hex(2)}"
    name, outside, inside = f"ketch-{tag}", f"kh{tag}", f"kp{tag}"
    subnet = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}"
    made = _ip("netns", "add", name)
    if made.returncode != 0:
        pytest.skip(f"network namespaces cannot be made here: {made.stderr.strip()}")
    try:
        for step in (
            ["link", "add", outside, "type", "veth", "peer", "name", inside],
            ["link", "set", inside, "netns", name],
            ["addr", "add", f"{subnet}.1/30", "dev", outside],
            ["link", "set", outside, "up"],
            ["-n", name, "addr", "add", f"{subnet}.2/30", "dev", inside],
            ["-n", name, "link", "set", inside, "up"],
            ["-n", name, "link", "set", "lo", "up"],
        ):
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield Namespace(name, f"{subnet}.1", f"{subnet}.2")
    finally:
        _ip("link", "del", outside)
        _ip("netns", "del", name)


def test_across_a_veth_pair_only_the_authorized_worker_joins(
    start_server: StartServer,
    start_worker: StartWorker,
    write_models: WriteModels,
    broker_keys: Path,
    tmp_path: Path,
    network_namespace: Namespace,
) -> None:
    """Another host, as far as the network goes: the worker's traffic leaves its own stack
    and reaches the broker on the veth address, never on loopback."""
    other = tmp_path / "other"
    assert keygen(other).returncode == 0
    models = write_models(SERVED)
    server = start_server(
        models,
        "--broker",
        f"tcp://{network_namespace.host}:*",
        "--broker-keys",
        str(broker_keys),
    )
    assert server.broker.startswith(f"tcp://{network_namespace.host}:")
    stranger = start_worker(
        f"{models}:double",
        server.broker,
        "--server-key",
        str(broker_keys / "server.key"),
        "--key",
        str(other / "worker.key_secret"),
        prefix=network_namespace.run,
    )
    server.wait_for(
        rf"refused a worker connection from {re.escape(network_namespace.peer)} with key .*: "
        "its key is not among the authorized worker keys"
    )
    stranger.wait_for_stderr(r"refused this worker")

    trusted = start_worker(
        f"{models}:double",
        server.broker,
        "--broker-keys",
        str(broker_keys),
        prefix=network_namespace.run,
    )
    server.wait_for(rf"model double:1 ready: worker pid {trusted.process.pid} ")
    workers = server.model_status("double")["workers"]
    assert [w["pid"] for w in workers] == [trusted.process.pid]
    assert server.predict("double", {"input": 5}).json()["output"] == 10


TYPED = """
    import ketch
    from ketch import TensorSpec

    @ketch.model(inputs=[TensorSpec("x", "float32", (3,))])
    def vec(xs):
        return [sum(x) for x in xs]
"""

RETYPED = """
    import ketch
    from ketch import TensorSpec

    @ketch.model(inputs=[TensorSpec("x", "float32", (5,))])
    def vec(xs):
        return [0.0 for x in xs]
"""


def test_a_worker_whose_tensors_differ_is_refused_and_the_model_keeps_its_own(
    start_server: StartServer,
    start_worker: StartWorker,
    write_models: WriteModels,
    broker_keys: Path,
) -> None:
    server = start_server(write_models(TYPED), "--broker-keys", str(broker_keys))
    impostor = start_worker(
        f"{write_models(RETYPED, 'retyped.py')}:vec",
        server.broker,
        "--broker-keys",
        str(broker_keys),
    )
    server.wait_for(
        rf"refused a worker connection from worker pid {impostor.process.pid} on \S+ \(vec:1\): "
        r"its inputs \(x: float32\[5\]\) are not the inputs of model 'vec:1' \(x: float32\[3\]\)"
    )
    metadata = server.client.get("/v2/models/vec").json()
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert server.predict("vec", {"input": [1, 2, 3]}).json()["output"] == 6
    assert server.predict("vec", {"input": [1, 2, 3, 4, 5]}).status_code == 400


class RoguePeer:
    """A DEALER that holds an authorized worker key and says whatever a test makes it say."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], broker: str, keys: Path) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        WorkerKeys.from_folder(keys).apply(self.socket)
        self.socket.connect(broker)

    def send(self, *frames: bytes) -> None:
        self.socket.send_multipart(list(frames))

    def say(self, command: Command, header: dict[str, Any]) -> None:
        self.socket.send_multipart(encode(command, header))

    def answer(self, timeout_s: float = START_DEADLINE_S) -> tuple[Command, dict[str, Any]]:
        """The broker's next message to this peer that is not a heartbeat."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if self.socket.poll(int(left * 1000)):
                frames = self.socket.recv_multipart()
                message = decode(frames)
                if message.command is not Command.HEARTBEAT:
                    return message.command, message.header
        raise AssertionError(f"the broker said nothing to this peer within {timeout_s} s")


def ready_header(model: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": model, "pid": 4242, "host": "rogue", "capacity": 1, **fields}


@pytest.fixture
def rogue_peer() -> Iterator[Callable[[str, Path], RoguePeer]]:
    """Make rogue peers on a broker, with a key it authorizes; all closed afterwards."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    peers: list[RoguePeer] = []

    def make(broker: str, keys: Path) -> RoguePeer:
        peers.append(RoguePeer(context, broker, keys))
        return peers[-1]

    yield make
    for peer in peers:
        peer.socket.close(linger=0)
    context.term()


def test_garbage_and_hundreds_of_fake_models_change_nothing(
    start_server: StartServer,
    write_models: WriteModels,
    broker_keys: Path,
    rogue_peer: Callable[[str, Path], RoguePeer],
) -> None:
    server = start_server(write_models(SERVED), "--broker-keys", str(broker_keys))
    assert server.predict("double", {"input": 1}).json()["output"] == 2
    series_before = len(server.client.get("/metrics").text.splitlines())

    garbage = rogue_peer(server.broker, broker_keys)
    garbage.send(b"\xff" * 64)
    garbage.send(PROTOCOL + b"\x42" + b"not msgpack")
    garbage.send(PROTOCOL + Command.READY.value + b"\x93\x01\x02\x03")
    garbage.say(Command.REPLY, {"id": 1})
    garbage.send(PROTOCOL + Command.READY.value + b"\x00" * (2 << 20))
    for expected in ("protocol error", "protocol error", "protocol error", "unknown worker"):
        command, header = garbage.answer()
        assert command is Command.DISCONNECT and expected in header["reason"]
    for expected in ("more than the 1048576 allowed",):
        command, header = garbage.answer()
        assert command is Command.DISCONNECT and expected in header["reason"]

    fakes = [rogue_peer(server.broker, broker_keys) for _ in range(300)]
    for number, fake in enumerate(fakes):
        fake.say(Command.READY, ready_header({"name": f"fake{number}", "version": "1"}))
    for number, fake in enumerate(fakes):
        command, header = fake.answer()
        assert command is Command.DISCONNECT and header["refused"] is True
        assert f"does not serve model 'fake{number}:1'" in header["reason"]

    # A READY for a served model that asks for too much is refused, and changes nothing.
    greedy = rogue_peer(server.broker, broker_keys)
    greedy.say(Command.READY, ready_header({"name": "double"}, capacity=10**6))
    command, header = greedy.answer()
    assert command is Command.DISCONNECT and "capacity" in header["reason"]

    models = server.client.get("/models").json()["models"]
    assert [m["name"] for m in models] == ["double"]
    assert server.predict("double", {"input": 21}).json()["output"] == 42
    metrics = server.client.get("/metrics").text
    assert "fake" not in metrics
    # Only the refusal counter and the second request's series are new.
    assert len(metrics.splitlines()) - series_before < 20
    refused = re.search(r'ketch_broker_refused_total\{stage="admission"\} (\S+)', metrics)
    assert refused is not None and float(refused.group(1)) == 302
    assert not any("Traceback" in line for line in server.stderr_lines)


# -- every route, fuzzed from the OpenAPI document -----------------------------------------

#: A model that takes anything, so that a 500 is the gateway's, not the model's failure.
FUZZED = """
    import ketch

    @ketch.model
    def echo(xs):
        return xs

    echoed = ketch.app("echoed", models=["echo"])
"""
FUZZ_ADMIN_TOKEN = "fuzz-admin-token"
#: Examples per operation and mode (inputs that fit the schema, and inputs that do not).
FUZZ_EXAMPLES = 50


def served_names(path: str) -> dict[str, str] | None:
    """The served model or application in the path of a route that predicts or describes, so
    that requests get past the name to what they send; /admin paths keep generated names,
    lest the fuzzing remove what it fuzzes."""
    if path.startswith(("/models/", "/v2/models/")):
        return {"name": "echo", "version": "1"} if "{version}" in path else {"name": "echo"}
    if path.startswith("/apps/"):
        return {"name": "echoed"}
    return None


def asked_for_it(case: Any, answer: Any) -> bool:
    """Whether a 5xx is the answer the request asked for: a 504 at the deadline it set itself
    (``X-Ketch-Timeout-Ms``, ``timeout_ms``, ``parameters.timeout``, which may be 1 µs)."""
    body = case.body if isinstance(case.body, dict) else {}
    parameters = body.get("parameters")
    asked = (
        any(name.lower() == "x-ketch-timeout-ms" for name in case.headers or {})
        or "timeout_ms" in body
        or (isinstance(parameters, dict) and "timeout" in parameters)
    )
    return asked and answer.status_code == 504


def test_no_route_answers_bad_input_with_a_5xx(
    start_server: StartServer, write_models: WriteModels
) -> None:
    """Schemathesis generates requests for every operation of ``/openapi.json``, valid and
    not, with the admin token so that /admin is reached too: none gets a 5xx, every answer
    but the metrics and build logs is JSON, and the server answers as before afterwards."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import Case, GenerationMode

    # A deploy's body is a gzip'd tar: sent as the bytes generated, like any binary body.
    schemathesis.serializer.alias("application/gzip", "application/octet-stream")
    server = start_server(
        write_models(FUZZED), "--admin-token", FUZZ_ADMIN_TOKEN, "--workers-per-model", "1"
    )
    schema = schemathesis.openapi.from_dict(server.client.get("/openapi.json").json())
    token = {"Authorization": f"Bearer {FUZZ_ADMIN_TOKEN}"}
    failures: list[str] = []
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            # Fixed examples, no shrinking and no example database: the same bounded run
            # every time, each failure reported as the request that caused it.
            @settings(
                max_examples=FUZZ_EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(mode, path_parameters=served_names(operation.path)))
            def call(case: Case) -> None:
                answer = case.call(base_url=server.url, session=session, headers=token, timeout=30)
                json_answer = answer.headers.get("content-type", [""])[0] == "application/json"
                server_error = answer.status_code >= 500 and not asked_for_it(case, answer)
                text_route = case.path == "/metrics" or case.path.endswith("/log")
                if server_error or not (json_answer or text_route):
                    failures.append(
                        f"{answer.status_code} {answer.text[:300]}\n  {case.as_curl_command()}"
                    )

            try:
                call()
            except Unsatisfiable:
                # Nothing to get wrong: an operation without parameters or body.
                assert mode is GenerationMode.NEGATIVE, operation.label
    session.close()
    assert failures == [], "\n".join(failures[:10])
    assert server.predict("echo", {"input": 21}).json()["output"] == 21
    assert server.client.get("/v2/health/ready").json() == {"ready": True}
    assert not any("Traceback" in line for line in server.stderr_lines), server.stderr_lines[-40:]


STALLING = """
    import ketch

    @ketch.model(stall_timeout_s=0.5, max_replicas=2)
    def double(xs):
        return [2 * x for x in xs]
"""


class SilentWorker(threading.Thread):
    """A peer with an authorized key that says READY for a served model, heartbeats, and
    never answers a batch: a hung worker, or a rogue one."""

    def __init__(self, broker: str, keys: Path) -> None:
        super().__init__(daemon=True)
        self.batches = 0
        self.done = threading.Event()
        self._broker, self._keys = broker, keys

    def run(self) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = context.socket(zmq.DEALER)
        WorkerKeys.from_folder(self._keys).apply(sock)
        sock.connect(self._broker)
        ready = {"model": {"name": "double"}, "pid": 4242, "host": "silent", "capacity": 1}
        sock.send_multipart(encode(Command.READY, ready))
        try:
            while not self.done.is_set():
                sock.send_multipart(encode(Command.HEARTBEAT))
                if sock.poll(50):
                    frames = sock.recv_multipart()
                    if decode(frames).command is Command.REQUEST:
                        self.batches += 1
        finally:
            sock.close(linger=0)
            context.term()


def test_batches_a_worker_never_answers_are_retried_and_the_worker_dropped(
    start_server: StartServer, write_models: WriteModels, broker_keys: Path
) -> None:
    server = start_server(
        write_models(STALLING), "--workers-per-model", "1", "--broker-keys", str(broker_keys)
    )
    server.wait_for(r"model double:1 ready: worker pid \d+", seen_too=True)
    silent = SilentWorker(server.broker, broker_keys)
    silent.start()
    try:
        server.wait_for(r"model double:1 ready: worker pid 4242 on silent")
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda x: server.predict("double", {"input": x}), range(40)))
        assert [a.status_code for a in answers] == [200] * 40
        assert [a.json()["output"] for a in answers] == [2 * x for x in range(40)]
        assert silent.batches >= 1  # it was sent work, which others then answered
        server.wait_for(r"lost worker pid 4242 on silent \(double:1\): it stalled", seen_too=True)
        assert 4242 not in {w["pid"] for w in server.model_status("double")["workers"]}
    finally:
        silent.done.set()
        silent.join(10)
