"""Who may be a worker: CURVE on the broker, as `ketch serve`, `ketch worker` and
`ketch keygen` set it up, tried with real processes on loopback."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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
