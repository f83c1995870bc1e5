"""``ketch deploy PATH`` and ``ketch deployments list|show|remove``: code pushed to a running
server with its environment (:mod:`ketch.http.deployments`).

``ketch deploy`` packs PATH (a file, a folder or a wheel) with a manifest saying what declares
its models and what environment it needs, streams it to ``POST /admin/deployments`` showing
the upload's progress, and with ``--wait`` follows the build's log until the new version's
models are ready (or prints why they are not, and exits 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, TypeAlias

from ketch.cli.http_client import DEFAULT_URL, READ_TIMEOUT_S, Upload, request_json
from ketch.deploys.archive import files_of, pack
from ketch.deploys.deployer import MANIFEST
from ketch.errors import KetchError

_Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: Where a lock given with ``--lock`` travels inside the archive.
LOCK_FOLDER = "_ketch_env"
#: How long ``--wait`` follows a deploy by default.
DEFAULT_WAIT_S = 900.0


def add_deploy_commands(commands: _Subcommands) -> None:
    deploy = commands.add_parser(
        "deploy",
        help="push code and its environment to a running server as a new version",
        description="Pack PATH (a .py file, a folder, or a wheel) with its environment, send "
        "it to a running server (which needs --admin-token), and serve the models it declares "
        "as a new version. The environment is what --requirements or --lock give, else the "
        "env= the code declares, else the server's own.",
    )
    deploy.add_argument("path", type=Path, metavar="PATH", help="a .py file, a folder or a .whl")
    deploy.add_argument(
        "--name", help="the deployment's name (default: the file's, folder's or wheel's name)"
    )
    deploy.add_argument(
        "--entry",
        help="what declares the models: a .py file of the folder (default app.py, or the one "
        ".py file at its top), or for a wheel the module to import (default: its name)",
    )
    env = deploy.add_mutually_exclusive_group()
    env.add_argument("--requirements", type=Path, metavar="FILE", help="a requirements file")
    env.add_argument(
        "--lock", type=Path, metavar="FILE", help="a uv.lock, with its pyproject.toml beside it"
    )
    deploy.add_argument(
        "--wait", action="store_true", help="follow the build and wait until the models answer"
    )
    deploy.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_WAIT_S,
        metavar="SECONDS",
        help="with --wait, the longest to wait (default %(default)s)",
    )
    _add_server_options(deploy)

    deployments = commands.add_parser(
        "deployments", help="list, show and remove what was deployed to a running server"
    )
    actions = deployments.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_server_options(actions.add_parser("list", help="every deployed version"))
    show = actions.add_parser("show", help="one deployment's versions, or one version")
    show.add_argument("which", metavar="NAME[:VERSION]")
    show.add_argument("--log", action="store_true", help="print the version's build log")
    _add_server_options(show)
    remove = actions.add_parser(
        "remove", help="stop serving a deployed version (or all of a name's) and forget it"
    )
    remove.add_argument("which", metavar="NAME[:VERSION]")
    _add_server_options(remove)


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        "--url",
        dest="url",
        default=os.environ.get("KETCH_URL") or DEFAULT_URL,
        metavar="URL",
        help=f"the server's HTTP address (default $KETCH_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("KETCH_ADMIN_TOKEN") or None,
        metavar="TOKEN",
        help="the server's admin token (default $KETCH_ADMIN_TOKEN; prefer the variable, "
        "which other users cannot read in the process list)",
    )
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer")


# -- ketch deploy ----------------------------------------------------------------------------


def run_deploy(args: argparse.Namespace) -> int:
    files, manifest = _what_to_pack(args)
    # Asked first: a wrong token or address fails now, not after the upload.
    request_json(args.url, "GET", "/admin/deployments", token=args.token)
    with tempfile.TemporaryDirectory(prefix="ketch-deploy-") as folder:
        extra = {MANIFEST: json.dumps(manifest, indent=2).encode(), **_lock_files(args)}
        packed = pack(files, extra, Path(folder) / "deploy.tar.gz")
        _say(f"packed {len(files)} files, {packed.size} bytes, digest {packed.digest[:12]}")
        answer = _upload(args.url, args.token, packed.path, packed.size)
    name, version = answer["name"], answer["version"]
    _say(f"deploying {name} version {version}")
    if not args.wait:
        _print(args, answer, f"{name} version {version}: {answer['state']}")
        return 0
    state = _follow(args.url, args.token, name, version, args.timeout)
    if state["state"] != "ready":
        print(f"ketch: error: {name} version {version}: {state['error']}", file=sys.stderr)
        return 1
    lines = [f"{name} version {version} is ready in {state['ready_s']:.1f} s:"]
    base = args.url.rstrip("/")
    lines += [f"  {base}{m['predict']}  (version {m['version']})" for m in state["models"]]
    _print(args, state, "\n".join(lines))
    return 0


def _what_to_pack(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, Any]]:
    path: Path = args.path
    manifest: dict[str, Any] = {}
    if path.suffix == ".whl" and path.is_file():
        files = {path.name: path}
        dist = path.name.split("-")[0]
        manifest.update(name=args.name or dist.replace("_", "-"), wheel=path.name)
        manifest["entry"] = args.entry or dist.lower()
    else:
        files = files_of(path)
        entry = args.entry or _default_entry(path, files)
        if entry not in files:
            raise KetchError(f"--entry {entry!r} is not a file of {path}")
        manifest.update(name=args.name or (path.stem if path.is_file() else path.resolve().name))
        manifest["entry"] = entry
    if args.requirements is not None:
        lines = args.requirements.read_text().splitlines()
        manifest["requirements"] = [line for line in lines if line.strip()]
    if args.lock is not None:
        manifest["lock"] = f"{LOCK_FOLDER}/uv.lock"
    return files, manifest


def _default_entry(path: Path, files: dict[str, Path]) -> str:
    if path.is_file():
        return path.name
    if "app.py" in files:
        return "app.py"
    top = [name for name in files if "/" not in name and name.endswith(".py")]
    if len(top) == 1:
        return top[0]
    raise KetchError(f"name the file of {path} that declares the models with --entry")


def _lock_files(args: argparse.Namespace) -> dict[str, bytes]:
    if args.lock is None:
        return {}
    project = args.lock.with_name("pyproject.toml")
    if not project.is_file():
        raise KetchError(f"--lock {args.lock}: its pyproject.toml is not beside it")
    return {
        f"{LOCK_FOLDER}/uv.lock": args.lock.read_bytes(),
        f"{LOCK_FOLDER}/pyproject.toml": project.read_bytes(),
    }


class _Progress:
    """A file read for upload, printing how much of it went out."""

    def __init__(self, handle: IO[bytes], size: int) -> None:
        self._handle, self._size, self._sent, self._shown = handle, size, 0, -1.0

    def read(self, amount: int = -1) -> bytes:
        chunk = self._handle.read(amount if amount > 0 else 1 << 20)
        self._sent += len(chunk)
        now = time.monotonic()
        if chunk and (now - self._shown > 0.5 or self._sent == self._size):
            self._shown = now
            percent = 100 * self._sent / self._size if self._size else 100
            end = "" if self._sent < self._size else "\n"
            line = f"\rketch: uploading {self._sent}/{self._size} bytes ({percent:.0f}%)"
            print(line, end=end, file=sys.stderr, flush=True)
        return chunk


def _upload(url: str, token: str | None, archive: Path, size: int) -> Any:
    with archive.open("rb") as handle:
        upload = Upload(_Progress(handle, size), size, "application/gzip")
        path = "/admin/deployments"
        return request_json(
            url, "POST", path, token=token, timeout_s=READ_TIMEOUT_S * 6, upload=upload
        )


def _follow(url: str, token: str | None, name: str, version: int, timeout_s: float) -> Any:
    """Print the deploy's log as the server writes it, until it is done; its final state."""
    path = f"/admin/deployments/{urllib.parse.quote(name)}/versions/{version}"
    for line in _streamed_lines(url, path + "/log?follow=1", token, timeout_s):
        print(line, file=sys.stderr, flush=True)
    return request_json(url, "GET", path, token=token)


def _streamed_lines(url: str, path: str, token: str | None, timeout_s: float) -> Iterator[str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(url.rstrip("/") + path, headers=headers)
    deadline = time.monotonic() + timeout_s
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            for raw in response:
                yield raw.decode(errors="replace").rstrip("\n")
                if time.monotonic() > deadline:
                    raise KetchError(f"the deploy took more than {timeout_s:g} s (--timeout)")
    except (urllib.error.URLError, OSError) as exc:
        raise KetchError(f"lost the deploy's log: {exc}") from None


# -- ketch deployments -----------------------------------------------------------------------


def run_deployments(args: argparse.Namespace) -> int:
    if args.action == "list":
        answer = request_json(args.url, "GET", "/admin/deployments", token=args.token)
        _print(args, answer, _table(answer["deployments"]))
        return 0
    name, _, version = args.which.partition(":")
    base = f"/admin/deployments/{urllib.parse.quote(name)}"
    path = f"{base}/versions/{int(version)}" if version else base
    if args.action == "remove":
        answer = request_json(args.url, "DELETE", path, token=args.token)
        _print(args, answer, f"removed {', '.join(answer['removed'])}")
        return 0
    if getattr(args, "log", False) and version:
        print("\n".join(_streamed_lines(args.url, path + "/log", args.token, READ_TIMEOUT_S)))
        return 0
    answer = request_json(args.url, "GET", path, token=args.token)
    _print(args, answer, _table(answer["versions"] if "versions" in answer else [answer]))
    return 0


def _table(states: list[dict[str, Any]]) -> str:
    if not states:
        return "no deployments"
    rows = [("NAME", "VERSION", "STATE", "ENV", "MODELS")]
    for state in states:
        models = ", ".join(f"{m['name']}:{m['version']}" for m in state["models"]) or "-"
        rows.append(
            (state["name"], str(state["version"]), state["state"], state["env"] or "-", models)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in rows
    )


def _print(args: argparse.Namespace, answer: Any, text: str) -> None:
    print(json.dumps(answer, indent=2) if args.json else text)


def _say(text: str) -> None:
    print(f"ketch: {text}", file=sys.stderr, flush=True)
