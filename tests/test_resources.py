"""Per-model resources, read back from the real worker processes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from ketch.specs.resources import Resources
from tests.conftest import KetchServer

Start = Callable[..., KetchServer]

LIMITED = """
    import os
    import time

    import numpy as np
    from threadpoolctl import threadpool_info

    import ketch

    @ketch.model(cpus=[0], threads=1, gpus=[1, 0])
    def environment(xs):
        blas = [pool["num_threads"] for pool in threadpool_info()]
        seen = {
            "omp": os.environ.get("OMP_NUM_THREADS"),
            "openblas": os.environ.get("OPENBLAS_NUM_THREADS"),
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "blas_threads": blas,
            "pid": os.getpid(),
        }
        return [seen] * len(xs)

    KEEP = []

    @ketch.model(memory_mb=150)
    def leaky(xs):
        if xs[0] == "huge":
            # 4 GB at once: refused by the kernel before any of it exists.
            KEEP.append(np.ones(4 * 1024**3 // 8))
        if xs[0] == "leak":
            KEEP.append(np.ones(300 * 1024 * 1024 // 8))  # 300 MB, really touched
            time.sleep(30)  # still computing when the gateway notices
        return [os.getpid()] * len(xs)
"""


@pytest.fixture
def limited(start_server: Start, write_models: Callable[..., Path]) -> KetchServer:
    return start_server(write_models(LIMITED))


def test_cpus_threads_and_gpus_reach_the_worker(limited: KetchServer) -> None:
    seen = limited.predict("environment", {"input": 0}).json()["output"]
    assert psutil.Process(seen["pid"]).cpu_affinity() == [0]
    assert (seen["omp"], seen["openblas"], seen["cuda"]) == ("1", "1", "1,0")
    assert seen["blas_threads"] and all(n == 1 for n in seen["blas_threads"])


def test_one_huge_allocation_is_refused_by_the_kernel_and_the_worker_lives_on(
    limited: KetchServer,
) -> None:
    first = limited.predict("leaky", {"input": "small"}).json()["output"]
    response = limited.predict("leaky", {"input": "huge"})
    assert response.status_code == 500
    assert "MemoryError" in response.json()["error"]
    again = limited.predict("leaky", {"input": "small"})
    assert (again.status_code, again.json()["output"]) == (200, first)
    limit_mb = psutil.Process(first).rlimit(psutil.RLIMIT_DATA)[0] // 2**20
    assert limit_mb == 2 * 150 + 256


def test_worker_over_its_memory_cap_is_recycled_with_a_clear_error(limited: KetchServer) -> None:
    first = limited.predict("leaky", {"input": "small"}).json()["output"]
    response = limited.predict("leaky", {"input": "leak"})
    assert response.status_code == 503
    error = response.json()["error"]
    assert f"worker pid {first} was recycled" in error
    assert "over its memory_mb cap of 150 MB" in error
    # Killed at once; the kernel may take a moment to free 300 MB before the gateway reaps it.
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(first).wait(timeout=10)
    assert not psutil.pid_exists(first)
    # A fresh worker serves the next request.
    again = limited.predict("leaky", {"input": "small"})
    assert again.status_code == 200
    assert again.json()["output"] != first
    assert limited.model_status("leaky")["worker_exits"] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cpus": []}, "at least one core"),
        ({"cpus": 0}, "list of indices"),
        ({"gpus": [-1]}, "indices >= 0"),
        ({"memory_mb": 0}, "memory_mb must be an int >= 1"),
        ({"threads": 1.5}, "threads must be an int >= 1"),
    ],
)
def test_invalid_resources_are_refused_naming_the_value(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        Resources(**kwargs)  # type: ignore[arg-type]


def test_cores_the_machine_lacks_fail_the_worker_with_the_reason(
    start_server: Start, write_models: Callable[..., Path]
) -> None:
    models = write_models(
        "import ketch\n\n@ketch.model(cpus=[4096])\ndef pinned(xs):\n    return xs\n"
    )
    server = start_server(models)
    response = server.predict("pinned", {"input": 1})
    assert response.status_code == 503
    assert "cannot pin the worker to cores [4096]" in server.model_status("pinned")["last_error"]
