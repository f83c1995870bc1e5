"""Discovery: what the served file (or deployed code) declares, read by importing it in a
throw-away process, since the gateway never imports user code.

The process is forked from the shared forkserver, or, for code that needs its own
environment (``env=``), started under that environment's interpreter
(:mod:`ketch.worker.discover` is its other side). Deployments found are checked here by their
runtimes, which import no framework to do so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from ketch.errors import TargetLoadError
from ketch.observability import events
from ketch.plugin_manager import Plugins
from ketch.pools.envs import EnvBuildError, Environments, EnvRequest, ensure_env
from ketch.pools.processes import forkserver_context, resolve_python, start_process
from ketch.specs.apps import AppSpec
from ketch.specs.deployments import Deployment
from ketch.specs.env_scan import declared_envs
from ketch.specs.models import ModelSpec
from ketch.specs.pipelines import PipelineSpec
from ketch.worker.discover import declared_payload

_env_log = logging.getLogger("ketch.envs")

#: Longest an import of the served code may take.
DISCOVERY_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Served:
    """What a served file declares: its models (deployments checked by their runtimes), its
    applications and its pipelines."""

    models: list[ModelSpec]
    apps: list[AppSpec]
    pipelines: list[PipelineSpec]


def discover(
    source: str,
    plugins: Plugins,
    python: str | None = None,
    timeout_s: float = DISCOVERY_TIMEOUT_S,
) -> Served:
    """The models and applications ``source`` declares, imported under ``python`` (None: the
    gateway's interpreter, through the forkserver)."""
    if python is None:
        status, payload = _in_forkserver(source, timeout_s)
    else:
        status, payload = _in_interpreter(source, python, timeout_s)
    if status != "ok":
        raise TargetLoadError(f"cannot load {source!r}:\n{payload}")
    models = [ModelSpec.from_dict(spec) for spec in payload["models"]]
    for data in payload["deployments"]:
        try:
            models.append(plugins.check_deployment(Deployment.from_dict(data)))
        except ValueError as exc:
            raise TargetLoadError(f"cannot load {source!r}: {exc}") from None
    return Served(
        models,
        [AppSpec.from_dict(spec) for spec in payload["apps"]],
        [PipelineSpec.from_dict(spec) for spec in payload["pipelines"]],
    )


async def discover_served(
    source: str, plugins: Plugins, environments: Environments, report: events.Report
) -> Served:
    """What ``source`` declares, imported under the environment its ``env=`` asks for (built
    first, once), with its models' workers under that environment's interpreter."""
    declared = declared_envs(source)
    if len(declared) > 1:
        raise TargetLoadError(
            f"{source!r} declares {len(declared)} different env=: the models of one file share "
            "one environment (give each environment its own file, and ketch deploy each)"
        )
    built = None
    if declared:
        request = EnvRequest.declared(declared[0])
        try:
            built = await ensure_env(environments, request, report, _env_log.info)
        except EnvBuildError as exc:
            raise TargetLoadError(f"cannot serve {source!r}: {exc}\n{exc.log}") from None
    python = built.python if built is not None else None
    served = await asyncio.get_running_loop().run_in_executor(
        None, discover, source, plugins, python
    )
    if built is None:
        return served
    models = [
        msgspec.structs.replace(
            spec, start=msgspec.structs.replace(spec.start, python=built.python)
        )
        if spec.start.env is not None
        else spec
        for spec in served.models
    ]
    return Served(models, served.apps, served.pipelines)


def _discover_in_child(source: str, conn: Any) -> None:
    try:
        conn.send(declared_payload(source))
    finally:
        conn.close()


def _in_forkserver(source: str, timeout_s: float) -> tuple[str, Any]:
    context = forkserver_context()
    receiver, sender = context.Pipe(duplex=False)
    process = start_process(context, _discover_in_child, (source, sender), "ketch-discover")
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise TargetLoadError(f"importing {source!r} took more than {timeout_s:.0f} s")
        try:
            answer: tuple[str, Any] = receiver.recv()
        except EOFError:
            process.join(5)
            raise TargetLoadError(
                f"importing {source!r} killed the process (exit code {process.exitcode})"
            ) from None
        return answer
    finally:
        receiver.close()
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()


def _in_interpreter(source: str, python: str, timeout_s: float) -> tuple[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ketch-discover-") as folder:
        answer = Path(folder) / "declared.json"
        argv = [resolve_python(python), "-m", "ketch.worker.discover", source, str(answer)]
        try:
            process = subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise TargetLoadError(
                f"importing {source!r} took more than {timeout_s:.0f} s"
            ) from None
        if not answer.is_file():
            raise TargetLoadError(
                f"importing {source!r} under {python} ended the process (exit code "
                f"{process.returncode})"
            )
        status, payload = json.loads(answer.read_text())
    return status, payload
