"""``ketch deploy``: code pushed to a running server with an environment the server's lacks.

The package the models import, ``ketchtest-greeting``, is a wheel each test builds into its
own wheelhouse (:mod:`tests.wheels`), and the requirements say ``--no-index --find-links``
that wheelhouse: environments are built by uv without any network.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import KetchServer
from tests.wheels import build_wheel

TOKEN = "deploy-test-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}

APP = """
    import greeting  # only the deployed environment has it

    import ketch


    @ketch.model
    def greet(names: list[str]) -> list[str]:
        return [greeting.hello(name) for name in names]
"""


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    folder = tmp_path / "wheelhouse"
    build_wheel(
        folder,
        "ketchtest-greeting",
        "1.0",
        {"greeting.py": "def hello(name):\n    return f'hello {name}'\n"},
    )
    return folder


@pytest.fixture
def requirements(tmp_path: Path, wheelhouse: Path) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text(f"--no-index\n--find-links {wheelhouse}\nketchtest-greeting==1.0\n")
    return path


@pytest.fixture
def app(tmp_path: Path) -> Path:
    folder = tmp_path / "greeter"
    folder.mkdir()
    (folder / "app.py").write_text(textwrap.dedent(APP))
    return folder / "app.py"


@pytest.fixture
def server() -> Iterator[Callable[..., KetchServer]]:
    """`ketch serve` with the management API on and nothing to serve at start."""
    started: list[KetchServer] = []

    def start(*extra: str) -> KetchServer:
        server = KetchServer(None, "--admin-token", TOKEN, *extra)
        started.append(server)
        return server.wait_ready()

    yield start
    for each in started:
        each.stop()


def deploy(server: KetchServer, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`ketch deploy ... --server URL` with the admin token in the environment."""
    command = [sys.executable, "-m", "ketch.cli.main", "deploy", *map(str, args)]
    return subprocess.run(
        [*command, "--server", server.url],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KETCH_ADMIN_TOKEN": TOKEN},
    )


def state(server: KetchServer, name: str, version: int) -> dict[str, object]:
    answer = server.client.get(f"/admin/deployments/{name}/versions/{version}", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def test_a_deploy_builds_its_environment_once_and_serves_a_new_version(
    server: Callable[..., KetchServer], app: Path, requirements: Path
) -> None:
    gateway = server()
    cold = deploy(gateway, app, "--requirements", requirements, "--wait")
    assert cold.returncode == 0, cold.stderr
    assert "uploading" in cold.stderr and "+ ketchtest-greeting==1.0" in cold.stderr
    assert f"{gateway.url}/models/greet/predict  (version 1)" in cold.stdout
    first = state(gateway, "app", 1)
    assert first["state"] == "ready" and first["env_cached"] is False
    assert gateway.predict("greet", {"input": "ada"}).json()["output"] == "hello ada"

    warm = deploy(gateway, app, "--requirements", requirements, "--wait")
    assert warm.returncode == 0, warm.stderr
    assert "is built already" in warm.stderr and "ketchtest-greeting" not in warm.stderr
    second = state(gateway, "app", 2)
    assert second["env_cached"] is True and second["env"] == first["env"]
    assert second["digest"] == first["digest"]  # the same code, stored once
    # A new version takes no traffic until it is rolled to.
    assert gateway.predict("greet", {"input": "bo"}).json()["version"] == "1"
    answer = gateway.predict("greet", {"input": "bo", "version": "2"}).json()
    assert (answer["output"], answer["version"]) == ("hello bo", "2")
    listed = gateway.client.get("/admin/deployments", headers=ADMIN).json()["deployments"]
    assert [(d["name"], d["version"], d["state"]) for d in listed] == [
        ("app", 1, "ready"),
        ("app", 2, "ready"),
    ]


def test_a_served_file_declares_its_environment_with_env(
    start_server: Callable[..., KetchServer], tmp_path: Path, wheelhouse: Path
) -> None:
    source = tmp_path / "served.py"
    env = ["--no-index", f"--find-links {wheelhouse}", "ketchtest-greeting==1.0"]
    # preload=True: its template, and the workers it forks, run in the environment too.
    declared = f"@ketch.model(env={env!r}, preload=True)\n"
    source.write_text(textwrap.dedent(APP).replace("@ketch.model\n", declared))
    gateway = start_server(source)
    gateway.wait_for(r"model greet:1 template ready", seen_too=True)
    assert gateway.predict("greet", {"input": "cy"}).json()["output"] == "hello cy"
    assert any("built in" in line for line in gateway.seen)


def test_what_was_deployed_is_served_again_after_a_restart(
    server: Callable[..., KetchServer], app: Path, requirements: Path
) -> None:
    gateway = server()
    for _ in range(2):
        assert deploy(gateway, app, "--requirements", requirements, "--wait").returncode == 0
    rolled = gateway.client.post("/admin/models/greet/roll", json={"version": "2"}, headers=ADMIN)
    assert rolled.status_code == 200, rolled.text
    gateway.stop()

    again = server()
    assert not any("building environment" in line for line in again.seen)
    versions = {m["version"] for m in again.client.get("/models").json()["models"]}
    assert versions == {"1", "2"}
    answer = again.predict("greet", {"input": "di"}).json()
    assert (answer["output"], answer["version"]) == ("hello di", "2")
    assert state(again, "app", 1)["state"] == "ready"


def test_a_rollback_under_load_fails_no_request(
    server: Callable[..., KetchServer], app: Path, requirements: Path
) -> None:
    gateway = server()
    for _ in range(2):
        assert deploy(gateway, app, "--requirements", requirements, "--wait").returncode == 0
    answers: list[tuple[int, str]] = []
    answered = threading.Condition()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            while not stop.is_set():
                answer = client.post("/models/greet/predict", json={"input": "ed"})
                with answered:
                    answers.append((answer.status_code, answer.json().get("version", "?")))
                    answered.notify_all()

    def served_by(version: str, count: int = 20) -> bool:
        """Wait (with a deadline) until ``count`` more answers came from ``version``."""
        with answered:
            start = len(answers)
            return answered.wait_for(
                lambda: sum(v == version for _, v in answers[start:]) >= count, timeout=30
            )

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        assert served_by("1")
        for version in ("2", "1", "2"):
            rolled = gateway.client.post(
                "/admin/models/greet/roll", json={"version": version}, headers=ADMIN
            )
            assert rolled.status_code == 200, rolled.text
            assert served_by(version)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert {status for status, _ in answers} == {200}


def test_a_build_that_fails_prints_its_log_and_serves_nothing(
    server: Callable[..., KetchServer], app: Path, tmp_path: Path, wheelhouse: Path
) -> None:
    gateway = server()
    missing = tmp_path / "missing.txt"
    missing.write_text(f"--no-index\n--find-links {wheelhouse}\nketchtest-absent==3.0\n")
    failed = deploy(gateway, app, "--requirements", missing, "--wait")
    assert failed.returncode == 1
    assert "ketchtest-absent" in failed.stderr and "No solution found" in failed.stderr
    assert state(gateway, "app", 1)["state"] == "failed"
    assert gateway.client.get("/models").json()["models"] == []
    assert gateway.predict("greet", {"input": "x"}).status_code == 404


def test_code_that_cannot_load_in_its_worker_fails_the_deploy(
    server: Callable[..., KetchServer], tmp_path: Path
) -> None:
    gateway = server()
    broken = tmp_path / "broken.py"
    broken.write_text(
        textwrap.dedent(
            """
            import multiprocess

            import ketch

            @ketch.model(cold_start_timeout_s=30)
            def fine(xs: list[int]) -> list[int]:
                return xs

            # Discovery imports it fine; its workers cannot.
            if multiprocess.current_process().name.startswith("ketch-worker-"):
                raise ImportError("libcuda.so.1: cannot open shared object file")
            """
        )
    )
    done = deploy(gateway, broken, "--wait")
    assert done.returncode == 1
    assert "libcuda.so.1" in done.stderr
    assert state(gateway, "broken", 1)["state"] == "failed"
    assert gateway.client.get("/models").json()["models"] == []
    assert gateway.client.get("/v2/health/ready").status_code == 200


def test_deploys_need_the_admin_token_and_refuse_unsafe_archives(
    server: Callable[..., KetchServer], tmp_path: Path
) -> None:
    gateway = server("--max-deploy-mb", "1")
    unsigned = gateway.client.post("/admin/deployments", content=b"x" * 100)
    assert unsigned.status_code == 401

    def archive(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            manifest = b'{"name": "evil", "entry": "app.py"}'
            info = tarfile.TarInfo("ketch-deploy.json")
            info.size = len(manifest)
            tar.addfile(info, io.BytesIO(manifest))
            tar.addfile(member, io.BytesIO(data) if data else None)
        return buffer.getvalue()

    link = tarfile.TarInfo("app.py")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    escape = tarfile.TarInfo("../escape.py")
    escape.size = 4
    for body, named in ((archive(link), "app.py"), (archive(escape, b"x = 1"[:4]), "escape")):
        refused = gateway.client.post("/admin/deployments", content=body, headers=ADMIN)
        assert refused.status_code == 400, refused.text
        assert named in refused.json()["error"]
    too_large = gateway.client.post(
        "/admin/deployments", content=os.urandom(2 * 2**20), headers=ADMIN
    )
    assert too_large.status_code == 413 and "--max-deploy-mb" in too_large.json()["error"]
    no_manifest = gateway.client.post("/admin/deployments", content=b"not gzip", headers=ADMIN)
    assert no_manifest.status_code == 400
    # Nothing was kept, and the server serves on.
    assert gateway.client.get("/admin/deployments", headers=ADMIN).json()["deployments"] == []
    assert gateway.client.get("/v2/health/ready").status_code == 200


def test_concurrent_deploys_of_one_name_are_serialized(
    server: Callable[..., KetchServer], app: Path, requirements: Path
) -> None:
    gateway = server()
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                deploy(gateway, app, "--requirements", requirements, "--wait")
            )
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    states = [state(gateway, "app", version) for version in (1, 2)]
    assert sorted(bool(s["env_cached"]) for s in states) == [False, True]  # built once


def test_a_wheel_deploys_with_its_module_as_the_entry(
    server: Callable[..., KetchServer], tmp_path: Path, wheelhouse: Path
) -> None:
    wheel = build_wheel(
        tmp_path / "dist",
        "shouter",
        "0.1",
        {
            "shouter.py": (
                "import ketch\n\n@ketch.model\n"
                "def shout(xs: list[str]) -> list[str]:\n    return [x.upper() for x in xs]\n"
            )
        },
    )
    gateway = server()
    done = deploy(gateway, wheel, "--wait")
    assert done.returncode == 0, done.stderr
    assert gateway.predict("shout", {"input": "hey"}).json()["output"] == "HEY"


def ketch_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ketch.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KETCH_ADMIN_TOKEN": TOKEN},
    )


def test_a_folder_deploys_with_its_uv_lock(
    server: Callable[..., KetchServer], app: Path, wheelhouse: Path
) -> None:
    folder = app.parent
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [project]
            name = "greeter"
            version = "0.1.0"
            requires-python = ">=3.11"
            dependencies = ["ketchtest-greeting==1.0"]

            [tool.uv]
            no-index = true
            find-links = ["{wheelhouse}"]
            """
        )
    )
    from uv import find_uv_bin

    locked = subprocess.run(
        [find_uv_bin(), "lock", "--project", str(folder)], capture_output=True, text=True
    )
    assert locked.returncode == 0, locked.stderr
    gateway = server()
    done = deploy(gateway, folder, "--lock", folder / "uv.lock", "--wait")
    assert done.returncode == 0, done.stderr
    assert "uv sync --frozen" in done.stderr
    assert gateway.predict("greet", {"input": "fy"}).json()["output"] == "hello fy"


def test_deployments_are_listed_shown_and_removed_from_the_command_line(
    server: Callable[..., KetchServer], app: Path, requirements: Path
) -> None:
    gateway = server()
    for _ in range(2):
        assert deploy(gateway, app, "--requirements", requirements, "--wait").returncode == 0
    where = ["--server", gateway.url]
    listed = ketch_cli("deployments", "list", *where)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split()[:3] for line in listed.stdout.splitlines()[1:]]
    assert rows == [["app", "1", "ready"], ["app", "2", "ready"]]
    log = ketch_cli("deployments", "show", "app:1", "--log", *where)
    assert "+ ketchtest-greeting==1.0" in log.stdout
    # Version 1 answers the requests without a version while version 2 is served.
    refused = ketch_cli("deployments", "remove", "app:1", *where)
    assert refused.returncode == 1 and "roll to another version first" in refused.stderr
    removed = ketch_cli("deployments", "remove", "app:2", *where)
    assert removed.returncode == 0, removed.stderr
    assert "removed app:2" in removed.stdout
    versions = [m["version"] for m in gateway.client.get("/models").json()["models"]]
    assert versions == ["1"]
    shown = ketch_cli("deployments", "show", "app", "--json", *where)
    assert [v["version"] for v in json.loads(shown.stdout)["versions"]] == [1]


def test_a_deploy_of_a_served_model_takes_the_next_version_under_its_name(
    tmp_path: Path, app: Path, requirements: Path
) -> None:
    served = tmp_path / "served.py"
    served.write_text(
        "import ketch\n\n@ketch.model\ndef greet(names: list[str]) -> list[str]:\n"
        "    return ['hi ' + n for n in names]\n"
    )
    gateway = KetchServer(served, "--admin-token", TOKEN)
    try:
        gateway.wait_ready()
        clash = deploy(gateway, app, "--requirements", requirements, "--wait")
        assert clash.returncode == 1
        assert "ketch deploy --name greet" in clash.stderr
        done = deploy(gateway, app, "--name", "greet", "--requirements", requirements, "--wait")
        assert done.returncode == 0, done.stderr
        assert gateway.predict("greet", {"input": "jo"}).json()["output"] == "hi jo"
        answer = gateway.predict("greet", {"input": "jo", "version": "2"}).json()
        assert (answer["output"], answer["version"]) == ("hello jo", "2")
    finally:
        gateway.stop()
