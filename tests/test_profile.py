"""`ketch profile`: each model of a file measured in worker processes of its own, at every batch
size up to its max_batch_size and per number of cores, written as JSON and printed; and the
errors a user gets for what cannot be profiled."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

MODELS = """
import os
import time

import ketch


@ketch.model(max_batch_size=6, inputs=[ketch.TensorSpec("x", "float32", (3,))])
def costly(xs):
    # An emulated accelerator: a fixed cost per batch and a cost per item.
    time.sleep(0.004 + 0.003 * len(xs))
    assert all(x.shape == (3,) for x in xs)
    return [float(x.sum()) for x in xs]


@ketch.model(max_batch_size=2)
def words(xs):
    return [len(x) for x in xs]


@ketch.model
def broken(xs):
    raise RuntimeError("cannot compute")
"""


def ketch_profile(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ketch.cli.main", "profile", "models.py", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_profile_has_every_batch_size_and_core_count_asked(
    write_models: Callable[[str], Path], tmp_path: Path
) -> None:
    write_models(MODELS)
    (tmp_path / "samples.json").write_text(json.dumps({"words": ["a", "bb", "ccc"]}))
    done = ketch_profile(
        tmp_path,
        "--models",
        "costly,words",
        "--inputs",
        "samples.json",
        "--cpus",
        "1",
        "--repeats",
        "5",
        "--out",
        "out.json",
    )
    assert done.returncode == 0, done.stderr
    profile = json.loads((tmp_path / "out.json").read_text())
    assert set(profile["models"]) == {"costly", "words"}
    costly = profile["models"]["costly"]
    assert costly["max_batch_size"] == 6
    (option,) = costly["options"]
    assert option["resources"] == {"cpus": [0], "threads": 1}
    batches = option["batches"]
    assert [b["batch_size"] for b in batches] == [1, 2, 4, 6]
    assert all(b["samples"] == 5 and 0 < b["p50_ms"] <= b["p99_ms"] for b in batches)
    # It costs more per batch and less per item as batches grow, as the model does.
    assert batches[-1]["p50_ms"] > batches[0]["p50_ms"]
    assert batches[-1]["throughput"] > batches[0]["throughput"]
    words = profile["models"]["words"]["options"][0]["batches"]
    assert [b["batch_size"] for b in words] == [1, 2]
    assert "MODEL" in done.stdout and "costly" in done.stdout
    assert "ketch: profile written to out.json" in done.stdout


def test_what_cannot_be_profiled_is_refused_with_the_reason(
    write_models: Callable[[str], Path], tmp_path: Path
) -> None:
    write_models(MODELS)
    no_inputs = ketch_profile(tmp_path, "--models", "words", "--repeats", "2")
    assert no_inputs.returncode == 2
    assert "model 'words:1' does not declare one numeric input tensor" in no_inputs.stderr
    assert "give sample inputs with --inputs" in no_inputs.stderr
    unknown = ketch_profile(tmp_path, "--models", "nope")
    assert unknown.returncode == 2
    assert "--models names ['nope'], which the file does not declare" in unknown.stderr
    (tmp_path / "samples.json").write_text(json.dumps({"broken": [1]}))
    failing = ketch_profile(
        tmp_path, "--models", "broken", "--inputs", "samples.json", "--repeats", "2"
    )
    assert failing.returncode == 2
    assert "profiling model 'broken:1' failed" in failing.stderr
    assert "cannot compute" in failing.stderr
    too_many = ketch_profile(tmp_path, "--cpus", "64")
    assert too_many.returncode == 2
    assert "--cpus [64]: this machine has" in too_many.stderr
    assert not (tmp_path / "profile.json").exists()
