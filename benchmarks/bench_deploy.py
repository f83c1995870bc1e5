"""What a deploy costs: ``ketch deploy`` to the first answer, against building the same
environment by hand with ``python -m venv`` and ``pip install``.

Set-up (not timed): ``pip download`` fetches ``requests`` and its dependencies into a local
wheelhouse once, and the requirements install from there (``--no-index --find-links``), so
that both sides install the same five wheels without the network in the timed part. The
model file imports ``requests`` at its top, which the server's environment need not have.

Each cold round starts a fresh server on a fresh store, with a fresh uv cache (``UV_CACHE_DIR``):
nothing is cached anywhere, and the figure is the time from launching ``ketch deploy app.py
--requirements ... --wait`` to the first 200 of the new version. Then, on the same server, each
warm round deploys the same code again (a new version, its environment already built) and is
timed the same way. The baseline, in the same run, is ``python -m venv DIR`` followed by
``DIR/bin/pip install`` of the same requirements, once per cold round in a fresh folder. Last,
the server is restarted on the same store: it serves the deployed versions again with their
pools at zero, and the time of the first request is a deployed model's cold start from zero
(a worker started under its environment's interpreter).

Run from anywhere: ``python benchmarks/bench_deploy.py [--rounds 3] [--cold-rounds 1] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ketch_server import ketch_executable
from report import at_least
from server_process import ServerError, ServerProcess

TOKEN = "bench-deploy-token"
PACKAGE = "requests==2.32.3"
APP = """\
import requests  # only the deployed environment has it

import ketch


@ketch.model
def version(xs: list[int]) -> list[str]:
    return [requests.__version__ for _ in xs]
"""
START_TIMEOUT_S = 120.0
ANSWER_TIMEOUT_S = 120.0


@dataclass
class Figures:
    cold_s: list[float] = field(default_factory=list)
    warm_s: list[float] = field(default_factory=list)
    baseline_s: list[float] = field(default_factory=list)
    restart_first_answer_s: list[float] = field(default_factory=list)


def _run(
    command: Sequence[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(command), capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise ServerError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return done


def _prepare(root: Path) -> Path:
    """The wheelhouse, the requirements file and the model file; returns the requirements."""
    wheelhouse = root / "wheelhouse"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--only-binary",
            ":all:",
            "--dest",
            str(wheelhouse),
            PACKAGE,
        ]
    )
    requirements = root / "requirements.txt"
    requirements.write_text(f"--no-index\n--find-links {wheelhouse}\n{PACKAGE}\n")
    (root / "app.py").write_text(APP)
    return requirements


def _server(root: Path, store: Path) -> ServerProcess:
    command = [
        ketch_executable(),
        "serve",
        "--admin-token",
        TOKEN,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--grpc-port",
        "0",
        "--broker",
        "tcp://127.0.0.1:*",
        "--store",
        str(store),
    ]
    return ServerProcess("ketch", command, cwd=root)


def _answer(url: str, version: int) -> None:
    """Wait (with a deadline) for the first 200 of ``version``."""
    body = json.dumps({"input": 1, "version": str(version)}).encode()
    request = urllib.request.Request(
        f"{url}/models/version/predict", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=ANSWER_TIMEOUT_S) as response:
        answer = json.loads(response.read())
    if answer.get("version") != str(version):
        raise ServerError(f"version {version} answered as {answer.get('version')}: {answer}")


def _deploy_to_answer(root: Path, url: str, requirements: Path, version: int) -> float:
    started = time.perf_counter()
    _run(
        [
            ketch_executable(),
            "deploy",
            str(root / "app.py"),
            "--server",
            url,
            "--requirements",
            str(requirements),
            "--wait",
        ],
        env={**os.environ, "KETCH_ADMIN_TOKEN": TOKEN},
    )
    _answer(url, version)
    return time.perf_counter() - started


def _baseline(root: Path, requirements: Path, index: int) -> float:
    venv = root / f"baseline-{index}"
    started = time.perf_counter()
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(requirements)])
    return time.perf_counter() - started


def _cold_round(root: Path, requirements: Path, index: int, rounds: int, figures: Figures) -> None:
    store = root / f"store-{index}"
    os.environ["UV_CACHE_DIR"] = str(root / f"uv-cache-{index}")
    os.environ["KETCH_STATE_DIR"] = str(root / f"state-{index}")
    with _server(root, store) as server:
        url = server.wait_ready(START_TIMEOUT_S)
        figures.cold_s.append(_deploy_to_answer(root, url, requirements, 1))
        for version in range(2, rounds + 2):
            figures.warm_s.append(_deploy_to_answer(root, url, requirements, version))
    with _server(root, store) as again:
        url = again.wait_ready(START_TIMEOUT_S)
        started = time.perf_counter()
        _answer(url, 2)
        figures.restart_first_answer_s.append(time.perf_counter() - started)
    figures.baseline_s.append(_baseline(root, requirements, index))


def _summary(values: list[float]) -> str:
    if not values:
        return "-"
    median = statistics.median(values)
    return f"{median:7.2f} s" + (
        f"  ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
    )


def _print(figures: Figures) -> None:
    baseline = statistics.median(figures.baseline_s)
    cold, warm = statistics.median(figures.cold_s), statistics.median(figures.warm_s)
    rows = [
        ("ketch deploy -> first answer, cold (no env, no uv cache)", _summary(figures.cold_s)),
        ("ketch deploy -> first answer, warm (env built)", _summary(figures.warm_s)),
        ("baseline: python -m venv + pip install", _summary(figures.baseline_s)),
        ("ratio cold / baseline", f"{cold / baseline:7.2f}"),
        ("ratio warm / baseline", f"{warm / baseline:7.2f}"),
        (
            "restart: first answer of a deployed model from zero",
            _summary(figures.restart_first_answer_s),
        ),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"requirements: {PACKAGE} and its dependencies, from a local wheelhouse")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=at_least(1), default=3, help="warm deploys per server")
    parser.add_argument("--cold-rounds", type=at_least(1), default=1, help="fresh servers")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    figures = Figures()
    saved = dict(os.environ)
    try:
        with tempfile.TemporaryDirectory(prefix="ketch-bench-deploy-") as folder:
            root = Path(folder)
            requirements = _prepare(root)
            for index in range(args.cold_rounds):
                _cold_round(root, requirements, index, args.rounds, figures)
    except (ServerError, urllib.error.URLError, OSError) as exc:
        print(f"bench_deploy: {exc}", file=sys.stderr)
        return 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    _print(figures)
    if args.json:
        print(json.dumps(asdict(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
