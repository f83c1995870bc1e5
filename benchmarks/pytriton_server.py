"""PyTriton's Triton Inference Server (on CPU) serving tiny numpy models, for
``bench_triton.py`` and ``tests/frameworks/test_triton.py``.

Two sides in one file. Run as a script by the python of a virtualenv with ``nvidia-pytriton``
(PyTriton pins numpy < 2, so it cannot share ketch's), it binds the models and says
``READY`` (on ``--ready-fd``, else on its output)::

    python pytriton_server.py HTTP_PORT GRPC_PORT METRICS_PORT WORKSPACE [--models ...]

Imported, :func:`run_server` starts that script on free ports, waits for its ``READY`` with a
deadline and always stops it and everything it started. This side needs the standard library
only, so that it imports both as ``pytriton_server`` (a benchmark's folder is on its path) and as
``benchmarks.pytriton_server`` (the test, from the repository root).

The models:

- ``affine``: ``x @ AFFINE_W + AFFINE_B``, float32[3] in, float32[2] out, Triton batches of at
  most ``--affine-max-batch-size``;
- ``two_io``: ``a`` float32[-1] and ``n`` int64[2] in, ``total`` (``a``'s sum) and ``doubled``
  (``n * 2``) out; an ``n`` holding ``REFUSED`` fails inside Triton;
- ``lengths``: ``text`` bytes[1] in, ``length`` int32[1] and ``upper`` bytes[1] out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYTRITON_VERSION = "0.7.0"
MODELS = ("affine", "two_io", "lengths")
AFFINE_W = [[1.0, 2.0], [0.5, -1.0], [-3.0, 0.25]]
AFFINE_B = [0.1, -0.2]
#: ``two_io`` raises on an item whose ``n`` holds this value.
REFUSED = 666
READY = "READY"
#: Starting Triton and its model processes on a busy machine.
START_TIMEOUT_S = 180.0
#: How long the server gets to stop Triton after SIGTERM before its process group is killed.
STOP_TIMEOUT_S = 30.0


def cached_venv() -> Path:
    """Where ``tests/frameworks/test_triton.py`` makes its PyTriton virtualenv (once per
    PyTriton version and Python), under ``$KETCH_TEST_CACHE`` or ``~/.cache/ketch-tests``."""
    root = Path(os.environ.get("KETCH_TEST_CACHE") or Path.home() / ".cache" / "ketch-tests")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return root / f"pytriton-{PYTRITON_VERSION}-{python}"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("", 0))  # Triton listens on every interface
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class ServerStartError(RuntimeError):
    """The server exited or printed no READY in time; the message ends with its last output."""


@dataclass(frozen=True)
class Endpoints:
    """Where a started server listens (``HOST:PORT``, as tritonclient takes it) and logs."""

    http: str
    grpc: str
    log: Path


@contextlib.contextmanager
def run_server(
    python: Path,
    folder: Path,
    *,
    models: Sequence[str] = MODELS,
    affine_max_batch_size: int = 8,
    timeout_s: float = START_TIMEOUT_S,
) -> Iterator[Endpoints]:
    """PyTriton's server with ``models`` on free ports, run by ``python`` in its own process
    group, with its script, workspace and log in ``folder``. On leaving, also by an exception:
    SIGTERM (the script stops Triton cleanly, freeing its shared memory), then SIGKILL for
    whatever of the group is left.

    :raises ServerStartError: no READY within ``timeout_s``, or the server exited first.
    """
    # A copy, so that PyTriton's interpreter does not find this folder's modules on its path.
    script = folder / "pytriton_server.py"
    shutil.copyfile(__file__, script)
    log = folder / "pytriton_server.log"
    http_port, grpc_port, metrics_port = free_ports(3)
    # READY comes on a pipe of its own: on the output, Triton's processes write beside the
    # script, and a log line written in pieces can wrap around it.
    ready_r, ready_w = os.pipe()
    command = [
        str(python),
        str(script),
        *map(str, (http_port, grpc_port, metrics_port)),
        str(folder / "workspace"),
        "--models",
        *models,
        "--affine-max-batch-size",
        str(affine_max_batch_size),
        "--ready-fd",
        str(ready_w),
    ]
    # PyTriton's Python backend loads libpython: under pyenv it is not on the loader's path.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=env,
        start_new_session=True,
        pass_fds=(ready_w,),
    )
    os.close(ready_w)
    # Set when the server says READY, or when it exits without saying it.
    settled, ready = threading.Event(), threading.Event()

    def copy_output() -> None:
        assert process.stdout is not None
        with process.stdout, open(log, "w") as output:
            for line in process.stdout:
                output.write(line)
                output.flush()
        settled.set()

    def await_ready() -> None:
        with os.fdopen(ready_r, "rb") as pipe:
            if pipe.read(len(READY)) == READY.encode():  # b"" when it exited first
                ready.set()
        settled.set()

    readers = [threading.Thread(target=f, daemon=True) for f in (copy_output, await_ready)]
    try:
        for reader in readers:
            reader.start()
        if not settled.wait(timeout_s) or not ready.is_set():
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            why = "exited before READY" if settled.is_set() else f"no READY in {timeout_s:g} s"
            raise ServerStartError(
                f"PyTriton's server did not start: {why} (exit code {process.poll()}); "
                f"the end of {log}:\n{tail}"
            )
        yield Endpoints(f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log)
    finally:
        stop_group(process)
        for reader in readers:
            reader.join(10)


def stop_group(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL for whatever of ``process``'s group is left."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def serve(argv: Sequence[str] | None = None) -> None:
    """The script: bind the models on PyTriton's Triton, say READY, serve until SIGTERM or
    SIGINT. Runs in PyTriton's virtualenv, hence the imports here."""
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    parser = argparse.ArgumentParser(description="PyTriton's server with tiny numpy models")
    for port in ("http_port", "grpc_port", "metrics_port"):
        parser.add_argument(port, type=int)
    parser.add_argument("workspace")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--affine-max-batch-size", type=int, default=8)
    parser.add_argument("--ready-fd", type=int, default=None, help="where to say READY")
    args = parser.parse_args(argv)

    weights = np.array(AFFINE_W, dtype=np.float32)
    bias = np.array(AFFINE_B, dtype=np.float32)

    @batch
    def affine(x: Any) -> dict[str, Any]:
        return {"y": x @ weights + bias}

    @batch
    def two_io(a: Any, n: Any) -> dict[str, Any]:
        if (n == REFUSED).any():
            raise ValueError(f"n={REFUSED} is refused by the model")
        return {"total": a.sum(axis=1, keepdims=True), "doubled": n * 2}

    @batch
    def lengths(text: Any) -> dict[str, Any]:
        words = [t[0].decode() for t in text]
        return {
            "length": np.array([[len(word)] for word in words], dtype=np.int32),
            "upper": np.array([[word.upper().encode()] for word in words], dtype=np.object_),
        }

    bindings: dict[str, dict[str, Any]] = {
        "affine": {
            "infer_func": affine,
            "inputs": [Tensor(name="x", dtype=np.float32, shape=(3,))],
            "outputs": [Tensor(name="y", dtype=np.float32, shape=(2,))],
            "config": ModelConfig(max_batch_size=args.affine_max_batch_size),
        },
        "two_io": {
            "infer_func": two_io,
            "inputs": [
                Tensor(name="a", dtype=np.float32, shape=(-1,)),
                Tensor(name="n", dtype=np.int64, shape=(2,)),
            ],
            "outputs": [
                Tensor(name="total", dtype=np.float32, shape=(1,)),
                Tensor(name="doubled", dtype=np.int64, shape=(2,)),
            ],
            "config": ModelConfig(max_batch_size=16),
        },
        "lengths": {
            "infer_func": lengths,
            "inputs": [Tensor(name="text", dtype=np.bytes_, shape=(1,))],
            "outputs": [
                Tensor(name="length", dtype=np.int32, shape=(1,)),
                Tensor(name="upper", dtype=np.bytes_, shape=(1,)),
            ],
            "config": ModelConfig(max_batch_size=16),
        },
    }

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # serve() stops Triton and its model processes on it

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    config = TritonConfig(
        http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port
    )
    # Unrestricted, so that callers can read inference statistics.
    security = TritonSecurityConfig(restricted_endpoints=[])
    with Triton(config=config, workspace=args.workspace, security_config=security) as triton:
        for name in args.models:
            triton.bind(name, **bindings[name])
        if args.ready_fd is None:
            print(READY, flush=True)
        else:
            os.write(args.ready_fd, READY.encode())
            os.close(args.ready_fd)
        triton.serve()


if __name__ == "__main__":
    serve()
