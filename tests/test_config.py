"""`ketch serve` settings from ketch.toml and KETCH_* variables: one order of precedence
(command line > environment > file > defaults), and errors that name where a bad value came
from."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ketch.cli.config import load_defaults, settings
from ketch.cli.main import _build_parsers
from tests.conftest import TEST_HEARTBEAT, KetchProcess, KetchServer

MODELS = """
import ketch

@ketch.model
def double(xs):
    return [2 * x for x in xs]
"""


def ketch(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ketch.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **env},
    )


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: every socket stays bound until all are picked."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def serve_parser() -> argparse.ArgumentParser:
    return _build_parsers()[1]["serve"]


def listening_port(cwd: Path, *extra: str) -> int:
    """Start `ketch serve` in ``cwd`` (where ketch.toml is) and return the port it listens on."""
    server = KetchProcess(["serve", *extra], cwd=cwd)
    try:
        return int(server.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
    finally:
        server.stop()


def test_precedence_file_then_environment_then_command_line(
    tmp_path: Path, write_models: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_models(MODELS)
    # Three named ports, not --port 0: an ephemeral port may be one just freed.
    from_file, from_env, from_command_line = free_ports(3)
    (tmp_path / "ketch.toml").write_text(
        "[serve]\n"
        'source = "models.py"\n'
        f"port = {from_file}\n"
        'broker = "tcp://127.0.0.1:*"\n'
        f"heartbeat_interval = {TEST_HEARTBEAT[1]}\n"
        f"heartbeat_liveness = {TEST_HEARTBEAT[3]}\n"
    )
    assert listening_port(tmp_path) == from_file
    monkeypatch.setenv("KETCH_PORT", str(from_env))
    assert listening_port(tmp_path) == from_env
    assert listening_port(tmp_path, "--port", str(from_command_line)) == from_command_line


def test_environment_over_file_in_process(tmp_path: Path) -> None:
    config = tmp_path / "other.toml"
    config.write_text(
        '[serve]\nport = 9000\nrequest_timeout = 5\nmodel = ["a=torch:a.pt2"]\nlog_level = "info"\n'
    )
    env = {"KETCH_REQUEST_TIMEOUT": "2.5", "KETCH_PLUGIN": os.pathsep.join(["x.py", "y.py"])}
    defaults = load_defaults(serve_parser(), config, env)
    assert defaults == {
        "port": 9000,
        "request_timeout": 2.5,
        "model": ["a=torch:a.pt2"],
        "log_level": "INFO",
        "plugin": ["x.py", "y.py"],
    }


def test_command_line_list_replaces_the_configured_one(tmp_path: Path) -> None:
    parser, configured = _build_parsers()
    serve_cmd = configured["serve"]
    serve_cmd.set_defaults(model=["a=torch:a.pt2"], plugin=["x.py"])
    args = parser.parse_args(["serve", "--model", "b=torch:b.pt2", "--model", "c=torch:c.pt2"])
    assert args.model == ["b=torch:b.pt2", "c=torch:c.pt2"]
    assert args.plugin == ["x.py"]


def test_every_option_is_a_file_key_and_a_variable() -> None:
    keys = {s.key for s in settings(serve_parser())}
    assert keys == {
        "source",
        "model",
        "host",
        "port",
        "grpc_port",
        "model_control",
        "broker",
        "gateways",
        "placement",
        "ray_address",
        "workers_per_model",
        "plan",
        "request_timeout",
        "state_dir",
        "state",
        "store",
        "max_deploy_mb",
        "log_format",
        "admin_token",
        "predict_token",
        "plugin",
        "log_level",
        "heartbeat_interval",
        "heartbeat_liveness",
        "broker_keys",
        "broker_max_message_mb",
        "max_body_mb",
        "read_timeout",
        "shutdown_grace",
    }


def test_unknown_key_is_named_with_the_known_ones(tmp_path: Path) -> None:
    (tmp_path / "ketch.toml").write_text('[serve]\nprot = 8080\nsource = "app.py"\n')
    result = ketch("serve", cwd=tmp_path)
    assert result.returncode == 2
    assert "ketch: error: config file ketch.toml: unknown key(s) in [serve]: prot" in result.stderr
    assert "known keys: admin_token, broker, " in result.stderr and "port" in result.stderr


def test_bad_file_value_names_file_key_and_value(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[serve]\nworkers_per_model = -1\n")
    result = ketch("serve", "--config", str(config), "x.py")
    assert result.returncode == 2
    assert f"config file {config}: [serve] workers_per_model: invalid value '-1'" in result.stderr


def test_bad_environment_value_names_the_variable() -> None:
    result = ketch("serve", "x.py", KETCH_HEARTBEAT_INTERVAL="nan")
    assert result.returncode == 2
    assert "ketch: error: environment variable KETCH_HEARTBEAT_INTERVAL: invalid value 'nan'" in (
        result.stderr
    )


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ketch.toml").write_text("[serve\n")
    result = ketch("serve", cwd=tmp_path)
    assert result.returncode == 2
    assert "config file ketch.toml is not valid TOML" in result.stderr


def test_serve_help_documents_every_option_and_the_precedence() -> None:
    result = ketch("serve", "--help")
    assert result.returncode == 0
    for action in serve_parser()._actions:
        for option in action.option_strings:
            assert option in result.stdout
        assert action.help and ("default" in action.help or action.dest == "help")
    assert "command line > environment > config file > defaults" in result.stdout
    assert "KETCH_PORT" in result.stdout and "ketch.toml" in result.stdout


def test_ketch_worker_reads_its_table_of_ketch_toml(
    tmp_path: Path,
    write_models: Callable[..., Path],
    start_server: Callable[..., KetchServer],
    broker_keys: Path,
) -> None:
    source = write_models(MODELS)
    server = start_server(source, "--broker-keys", str(broker_keys))
    heartbeat = dict(zip(TEST_HEARTBEAT[::2], TEST_HEARTBEAT[1::2], strict=True))
    (tmp_path / "ketch.toml").write_text(
        "[serve]\nport = 1\n"  # another command's table: read by ketch serve only
        f'[worker]\ntarget = "{source}:double"\nconnect = "{server.broker}"\n'
        f"heartbeat_interval = {heartbeat['--heartbeat-interval']}\n"
        f"heartbeat_liveness = {heartbeat['--heartbeat-liveness']}\n"
        f'broker_keys = "{broker_keys}"\n'
    )
    worker = KetchProcess(["worker"], cwd=tmp_path)
    try:
        server.wait_for(rf"model double:1 ready: worker pid {worker.process.pid} ")
        assert server.predict("double", {"input": 4}).json()["output"] == 8
    finally:
        worker.stop()


def test_ketch_worker_without_a_target_says_where_to_give_one(tmp_path: Path) -> None:
    result = ketch("worker", cwd=tmp_path)
    assert result.returncode == 2
    assert "ketch worker needs the model: PATH_OR_MODULE[:name], KETCH_TARGET" in result.stderr
