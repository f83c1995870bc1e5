"""The example third-party plugin (examples/ketch-roundrobin), installed with pip as a user
would, found through its entry point and used end to end over HTTP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import KetchServer

Start = Callable[..., KetchServer]
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ketch-roundrobin"

APPS = """
import ketch


@ketch.model(min_replicas=1)
def first(xs):
    return ["first" for _ in xs]


@ketch.model(min_replicas=1)
def second(xs):
    return ["second" for _ in xs]


balanced = ketch.app(
    "balanced", models=["first", "second"], policy="round_robin", params={"start": 1}
)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the example package (without its ketch dependency, which is the ketch
    under test) into a folder that the test's processes get on their PYTHONPATH."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        timeout=300,
    )
    return target


@pytest.fixture
def on_path(installed: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYTHONPATH", str(installed))
    monkeypatch.delenv("KETCH_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    return installed


def ketch_plugins(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ketch.cli.main", "plugins", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_ketch_plugins_lists_the_installed_plugin_and_where_it_came_from(on_path: Path) -> None:
    listing = ketch_plugins()
    assert listing.returncode == 0, listing.stderr
    line = next(line for line in listing.stdout.splitlines() if line.startswith("roundrobin"))
    assert "entry point ketch_roundrobin (ketch-roundrobin 0.1.0)" in line
    assert line.split()[-2:] == ["round_robin", "-"]
    assert re.search(
        r"^ketch\.plugins\.bandits +built in +epsilon_greedy, ucb1, thompson, exp3 +-$",
        listing.stdout,
        re.MULTILINE,
    )


def test_an_application_uses_the_third_party_policy_over_http(
    on_path: Path, start_server: Start, tmp_path: Path
) -> None:
    source = tmp_path / "apps.py"
    source.write_text(APPS)
    server = start_server(source)
    answers = [
        server.client.post("/apps/balanced/predict", json={"input": i}).json() for i in range(4)
    ]
    assert [a["output"] for a in answers] == ["second", "first", "second", "first"]
    for answer in answers[:2]:
        response = server.client.post(
            "/apps/balanced/feedback", json={"query_id": answer["query_id"], "reward": 1}
        )
        assert response.status_code == 200, response.text
    (status,) = server.client.get("/apps").json()["apps"]
    assert status["plugin"] == "roundrobin"
    assert status["policy_state"]["served"] == {"first": 2, "second": 2}
    assert status["policy_state"]["mean_reward"] == {"first": 1.0, "second": 1.0}


def test_autoload_can_be_turned_off(
    on_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KETCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    listing = ketch_plugins()
    assert listing.returncode == 0 and "roundrobin" not in listing.stdout
    source = tmp_path / "apps.py"
    source.write_text(APPS)
    server = KetchServer(source)
    try:
        assert server.process.wait(60) == 2
        server.wait_for_stderr(r"application 'balanced': no policy named 'round_robin'")
    finally:
        server.stop()
    # Named explicitly, the module loads even with autoload off.
    explicit = ketch_plugins("--plugin", "ketch_roundrobin")
    assert "--plugin ketch_roundrobin" in explicit.stdout


def test_the_example_annotates_its_hook_with_the_public_register_type(installed: Path) -> None:
    # Resolved in a fresh interpreter, as a type checker or a docs tool would resolve it.
    check = (
        "import typing, ketch, ketch_roundrobin\n"
        "hints = typing.get_type_hints(ketch_roundrobin.ketch_register_policies)\n"
        "assert hints['register'] == ketch.RegisterPolicy, hints\n"
        "assert {'RegisterPolicy', 'RegisterRuntime'} <= set(ketch.__all__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
