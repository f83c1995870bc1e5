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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import KetchProcess, KetchServer

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
    server.wait_for(r"refused a worker connection from .*: it does not speak CURVE")
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
    server = start_server(write_models(SERVED), "--broker-keys", str(authorized))
    stranger = start_worker(
        f"{write_models(ROGUE, 'rogue.py')}:triple",
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
    assert server.predict("triple", {"input": 1}).status_code == 404
    stranger.wait_for_stderr(r"refused this worker: this worker's public key is not among")

    # The folder is read again when it changes: no restart needed.
    shutil.copyfile(other / "worker.key", authorized / "authorized" / "other.key")
    server.wait_for(rf"model triple:3 ready: worker pid {stranger.process.pid} ")
    assert server.predict("triple", {"input": 2}).json()["output"] == 6


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
    server = start_server(write_models(SERVED), "--insecure-broker")
    assert any("INSECURE BROKER" in line for line in server.stderr_lines)
    start_worker(f"{write_models(ROGUE, 'rogue.py')}:triple", server.broker, "--insecure-broker")
    server.wait_for(r"model triple:3 ready")
    assert server.predict("triple", {"input": 3}).json()["output"] == 9


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
    server = start_server(
        write_models(SERVED),
        "--broker",
        f"tcp://{network_namespace.host}:*",
        "--broker-keys",
        str(broker_keys),
    )
    assert server.broker.startswith(f"tcp://{network_namespace.host}:")
    rogue = write_models(ROGUE, "rogue.py")
    stranger = start_worker(
        f"{rogue}:triple",
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
    assert server.predict("triple", {"input": 1}).status_code == 404

    trusted = start_worker(
        f"{rogue}:triple",
        server.broker,
        "--broker-keys",
        str(broker_keys),
        prefix=network_namespace.run,
    )
    server.wait_for(rf"model triple:3 ready: worker pid {trusted.process.pid} ")
    assert server.predict("triple", {"input": 5}).json()["output"] == 15
    assert server.predict("double", {"input": 5}).json()["output"] == 10
