"""``python=``: a model's workers run under another interpreter, here virtualenvs the tests make.

The "trained" environment is a real virtualenv with its own ``sys.prefix`` and a package only
it has (``venv_only``); ketch and its dependencies reach it through a ``.pth`` file naming
this environment's site-packages, as a ``pip install ketch`` there would provide them. A
second, bare virtualenv has no ketch at all.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import KetchServer

Start = Callable[..., KetchServer]
WriteModels = Callable[..., Path]


def make_virtualenv(path: Path, *, with_ketch: bool) -> Path:
    """A virtualenv at ``path`` (no pip: nothing to download); returns its interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site_packages / "venv_only.py").write_text(f"WHERE = {str(path)!r}\n")
    if with_ketch:
        ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        # addsitedir (not a bare path line) also runs the .pth files there: an editable
        # install of ketch is one.
        lines = [f"import site; site.addsitedir({directory!r})" for directory in sorted(ours)]
        (site_packages / "ketch_from_parent.pth").write_text("\n".join(lines) + "\n")
    return python


MODELS = """
    import os
    import sys

    import ketch

    TRAINED = {trained!r}
    BARE = {bare!r}

    # The served file is also imported by the gateway (to find its models): what only the
    # model's environment has is imported inside the function.
    @ketch.model(python=TRAINED, cpus=[0], threads=1)
    def isolated(xs):
        import venv_only

        return [
            {{
                "prefix": sys.prefix,
                "executable": sys.executable,
                "venv_only": venv_only.WHERE,
                "pid": os.getpid(),
                "threads": os.environ.get("OMP_NUM_THREADS"),
                "x": x,
            }}
            for x in xs
        ]

    @ketch.model(python=TRAINED, preload=True)
    def isolated_preloaded(xs):
        return [{{"prefix": sys.prefix, "pid": os.getpid(), "parent": os.getppid()}} for _ in xs]

    @ketch.model(python=BARE)
    def without_ketch(xs):
        return xs

    @ketch.model(python="/nonexistent/env/bin/python")
    def missing(xs):
        return xs

    @ketch.model
    def here(xs):
        return [sys.prefix for _ in xs]
"""


@pytest.fixture(scope="module")
def environments(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("envs")
    return (
        make_virtualenv(root / "trained", with_ketch=True),
        make_virtualenv(root / "bare", with_ketch=False),
    )


@pytest.fixture
def server(
    start_server: Start, write_models: WriteModels, environments: tuple[Path, Path]
) -> KetchServer:
    trained, bare = environments
    return start_server(write_models(MODELS.format(trained=str(trained), bare=str(bare))))


def test_worker_runs_under_the_models_interpreter_with_its_resources(
    server: KetchServer, environments: tuple[Path, Path]
) -> None:
    trained = environments[0]
    response = server.predict("isolated", {"inputs": [1, 2]})
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    venv = str(trained.parent.parent)
    assert {o["prefix"] for o in outputs} == {venv}
    assert {o["venv_only"] for o in outputs} == {venv}
    assert outputs[0]["executable"] == str(trained)
    assert [o["x"] for o in outputs] == [1, 2]
    # The model's limits reach a worker in another interpreter too.
    worker = psutil.Process(outputs[0]["pid"])
    assert worker.cpu_affinity() == [0]
    assert outputs[0]["threads"] == "1"
    # Models without python= still run under the gateway's interpreter.
    assert server.predict("here", {"input": 0}).json()["output"] == sys.prefix


def test_preloaded_template_runs_under_the_models_interpreter(
    server: KetchServer, environments: tuple[Path, Path]
) -> None:
    server.wait_for(r"model isolated_preloaded:1 template ready", seen_too=True)
    template = server.model_status("isolated_preloaded")["template"]
    assert psutil.Process(template["pid"]).cmdline()[0] == str(environments[0])
    output = server.predict("isolated_preloaded", {"input": 1}).json()["output"]
    assert output["prefix"] == str(environments[0].parent.parent)
    assert output["parent"] == template["pid"]


def test_environment_without_ketch_makes_the_model_unhealthy_saying_so(
    server: KetchServer,
) -> None:
    response = server.predict("without_ketch", {"input": 1})
    assert response.status_code == 503
    error = response.json()["error"]
    assert "No module named 'ketch'" in error
    assert "install ketch" in error
    # Everything else is still served.
    assert server.predict("here", {"input": 0}).status_code == 200


def test_missing_interpreter_is_reported_at_start(server: KetchServer) -> None:
    cause = server.wait_for(r"model missing:1 unhealthy: (.*)", seen_too=True).group(1)
    assert "python='/nonexistent/env/bin/python': no executable interpreter" in cause
    response = server.predict("missing", {"input": 1})
    assert response.status_code == 503
    assert "/nonexistent/env/bin/python" in json.dumps(response.json())
