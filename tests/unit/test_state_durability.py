"""Policy state on disk: written whole and flushed (the file before its rename, the directory
after it), failures that name the file and the step, and saving that tries again.

A crash cannot be staged in a test, so ``os.fsync`` is watched instead: what the test checks is
that every write flushes the file and then its directory, in that order around the rename."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

import ketch
from ketch.applications import saving
from ketch.applications.saving import StateSaver
from ketch.applications.state import FileStateStore, StateNotSaved
from ketch.policy import Policy
from ketch.specs.apps import AppSpec
from tests.unit.fakes import in_loop

SPEC = ketch.app("learner", models=["a", "b"], policy="ucb1")


class Learner:
    """An application as the saver sees it."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.spec: AppSpec = SPEC
        self.policy: Policy = _StatePolicy(state)
        self.dirty = True
        self.applied: str | None = None


class _StatePolicy(Policy):
    def __init__(self, state: dict[str, Any]) -> None:
        super().__init__(("a", "b"))
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


Steps = list[tuple[str, str]]


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> Steps:
    """What the write did to the disk, in order: ("fsync", "file"/"directory"), ("replace", to)."""
    done: Steps = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        kind = "directory" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file"
        done.append(("fsync", kind))
        real_fsync(descriptor)

    def replace(source: Any, target: Any) -> None:
        done.append(("replace", Path(target).name))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return done


def test_a_write_flushes_the_file_renames_it_then_flushes_the_directory(
    tmp_path: Path, steps: Steps
) -> None:
    store = FileStateStore(tmp_path)
    store.save(SPEC, {"pulls": {"a": 3, "b": 1}})
    assert steps == [("fsync", "file"), ("replace", "learner.json"), ("fsync", "directory")]
    saved = orjson.loads(store.path_of("learner").read_bytes())
    assert saved == {
        "app": "learner",
        "policy": "ucb1",
        "models": ["a", "b"],
        "state": {"pulls": {"a": 3, "b": 1}},
    }
    loaded = store.load(SPEC)
    assert loaded is not None and loaded.state == {"pulls": {"a": 3, "b": 1}}
    assert sorted(p.name for p in store.path_of("learner").parent.iterdir()) == ["learner.json"]


def _failing_fsync(monkeypatch: pytest.MonkeyPatch, kind: str, code: int) -> Callable[[int], None]:
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        is_directory = stat.S_ISDIR(os.fstat(descriptor).st_mode)
        if is_directory == (kind == "directory"):
            raise OSError(code, os.strerror(code))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return fsync


def test_a_file_that_cannot_be_flushed_leaves_the_previous_state_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStateStore(tmp_path)
    store.save(SPEC, {"pulls": {"a": 1}})
    _failing_fsync(monkeypatch, "file", errno.EIO)
    with pytest.raises(StateNotSaved) as failed:
        store.save(SPEC, {"pulls": {"a": 2}})
    message = str(failed.value)
    assert message.startswith(
        f"the policy state of application 'learner' was not saved to {store.path_of('learner')}:"
        " flushing "
    )
    assert message.endswith(f" to the disk failed: {os.strerror(errno.EIO)}")
    loaded = store.load(SPEC)
    assert loaded is not None and loaded.state == {"pulls": {"a": 1}}
    assert [p.name for p in store.path_of("learner").parent.iterdir()] == ["learner.json"]


def test_a_directory_that_cannot_be_flushed_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_fsync(monkeypatch, "directory", errno.EIO)
    with pytest.raises(StateNotSaved, match=r"flushing the directory .* \(the file is renamed\)"):
        FileStateStore(tmp_path).save(SPEC, {"pulls": {"a": 2}})


def test_a_file_system_that_cannot_flush_directories_still_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_fsync(monkeypatch, "directory", errno.EINVAL)
    FileStateStore(tmp_path).save(SPEC, {"pulls": {"a": 2}})
    loaded = FileStateStore(tmp_path).load(SPEC)
    assert loaded is not None and loaded.state == {"pulls": {"a": 2}}


def test_a_state_directory_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file, not a folder")
    with pytest.raises(StateNotSaved, match=r"creating .*state/apps failed: "):
        FileStateStore(tmp_path / "state").save(SPEC, {})


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


@in_loop
async def test_a_failed_save_is_logged_once_and_tried_again_until_it_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(saving, "SAVE_INTERVAL_S", 0.01)
    blocked = tmp_path / "state"
    blocked.write_text("a file, not a folder")
    store = FileStateStore(blocked)
    learner = Learner({"pulls": {"a": 5}})
    attempts: list[str] = []
    write = store.write

    def counted_write(app_name: str, content: bytes, applied: str | None) -> None:
        attempts.append(app_name)
        write(app_name, content, applied)

    monkeypatch.setattr(store, "write", counted_write)
    saver = StateSaver(store, lambda: [learner])
    caplog.set_level(logging.WARNING, logger="ketch.apps")
    saver.start()
    # Nothing marks the application changed again: each new attempt is the saver's retry.
    await _until(lambda: len(attempts) >= 3)
    blocked.unlink()
    await _until(lambda: store.path_of("learner").is_file())
    await saver.stop()
    failures = [r.getMessage() for r in caplog.records if "was not saved" in r.getMessage()]
    assert len(failures) == 1, failures
    assert failures[0].endswith("; trying again every 0.01 s")
    assert "the policy state of application 'learner' is saved again" in caplog.text
    loaded = store.load(SPEC)
    assert loaded is not None and loaded.state == {"pulls": {"a": 5}}


@in_loop
async def test_stopping_writes_what_changed_since_the_last_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(saving, "SAVE_INTERVAL_S", 0.01)
    store = FileStateStore(tmp_path)
    learner = Learner({"pulls": {"a": 1}})
    saver = StateSaver(store, lambda: [learner])
    saver.start()
    await _until(lambda: store.path_of("learner").is_file() and not learner.dirty)
    learner.policy = _StatePolicy({"pulls": {"a": 2}})
    learner.dirty = True
    await saver.stop()
    loaded = store.load(SPEC)
    assert loaded is not None and loaded.state == {"pulls": {"a": 2}}
