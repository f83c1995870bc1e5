"""The `ketch` command's own errors: each exits 2 at once and says what was wrong."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).parents[1] / "examples" / "quickstart.py"


def ketch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ketch.cli.main", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_http_port_in_use(busy_port: int) -> None:
    result = ketch(
        "serve", str(QUICKSTART), "--port", str(busy_port), "--broker", "tcp://127.0.0.1:*"
    )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{busy_port}: Address already in use" in result.stderr
    assert "ketch: ready" not in result.stdout


def test_broker_port_in_use(busy_port: int) -> None:
    result = ketch(
        "serve", str(QUICKSTART), "--port", "0", "--broker", f"tcp://127.0.0.1:{busy_port}"
    )
    assert result.returncode == 2
    assert f"cannot bind the broker to tcp://127.0.0.1:{busy_port}" in result.stderr
    assert "ketch: ready" not in result.stdout


def test_broken_file_fails_with_the_cause(write_models: Callable[..., Path]) -> None:
    broken = write_models("import ketch\nraise RuntimeError('bad config')\n", "broken.py")
    result = ketch("serve", str(broken), "--port", "0", "--broker", "tcp://127.0.0.1:*")
    assert result.returncode == 2
    assert "RuntimeError: bad config" in result.stderr


def test_file_without_models(write_models: Callable[..., Path]) -> None:
    empty = write_models("X = 1\n", "empty.py")
    result = ketch("serve", str(empty), "--port", "0", "--broker", "tcp://127.0.0.1:*")
    assert result.returncode == 2
    assert "defines no model: decorate a function with @ketch.model" in result.stderr


def test_unknown_module() -> None:
    result = ketch("serve", "no_such_module_here", "--port", "0", "--broker", "tcp://127.0.0.1:*")
    assert result.returncode == 2
    assert "neither a Python file nor an importable module" in result.stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [("--workers-per-model", "-1"), ("--port", "70000"), ("--heartbeat-interval", "nan")],
)
def test_invalid_options_are_refused_by_name(option: str, value: str) -> None:
    result = ketch("serve", str(QUICKSTART), option, value)
    assert result.returncode == 2
    assert option in result.stderr


def test_serve_help_documents_every_option() -> None:
    result = ketch("serve", "--help")
    assert result.returncode == 0
    for option in ("--host", "--port", "--broker", "--workers-per-model", "--request-timeout"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["models", "add", "echo"], "'echo' is not NAME=RUNTIME:PATH"),
        (["models", "scale", "echo"], "models scale needs at least one of --min, --max"),
        (["models", "scale", "echo", "--min", "-1"], "--min"),
        (["apps", "set", "calc"], "apps set needs at least one of --policy"),
        (["apps", "add", "calc"], "--model"),
        (["apps", "add", "calc", "--model", "m", "--default-output", "{x"], "is not JSON"),
        (["apps", "add", "calc", "--model", "m", "--param", "gamma"], "'gamma' is not KEY=VALUE"),
    ],
)
def test_bad_admin_arguments_are_refused_before_any_request(args: list[str], says: str) -> None:
    result = ketch(*args, "--url", "http://127.0.0.1:1")  # nothing listens: no request made
    assert result.returncode == 2
    assert says in result.stderr
    assert "cannot reach" not in result.stderr


def test_admin_command_against_an_unreachable_server_exits_2() -> None:
    result = ketch("models", "list", "--url", "http://127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.startswith("ketch: error: cannot reach http://127.0.0.1:1/admin/models")


@pytest.mark.parametrize("command", ["models", "apps"])
def test_admin_help_lists_every_action(command: str) -> None:
    result = ketch(command, "--help")
    assert result.returncode == 0
    actions = ["list", "add", "remove"]
    actions += ["scale", "roll"] if command == "models" else ["link", "unlink", "set"]
    for action in actions:
        assert f"    {action} " in result.stdout
    assert "KETCH_ADMIN_TOKEN" in result.stdout
