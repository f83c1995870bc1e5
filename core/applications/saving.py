"""When the applications' policy state is written (to disk or Redis, its
:class:`~ketch.applications.state.StateStore`): about once a second what changed, when an
application is removed, and when the gateway stops.

Each round takes the changed policies' state in the event loop (a policy is not thread-safe)
and encodes it there, then writes the files in one writer thread: a flushed write
(``fsync``, :mod:`ketch.applications.state`) can take a while on a busy disk, and must not
hold up the requests the loop serves. One thread keeps the writes in the order their state
was taken. A write that fails is logged once per distinct reason and tried again each round
until it succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from ketch.applications.state import StateNotSaved, StateStore
from ketch.policy import Policy
from ketch.specs.apps import AppSpec

log = logging.getLogger("ketch.apps")

#: How often changed policy state is written to disk.
SAVE_INTERVAL_S = 1.0


class Saved(Protocol):
    """What saving needs of an application; ``dirty`` says its policy learnt since."""

    spec: AppSpec
    policy: Policy
    dirty: bool
    #: The position in the shared feedback stream its policy has learnt up to (Redis).
    applied: str | None


#: Applications whose state was taken, with what is stored for it and its stream position.
_Pending = list[tuple[Saved, bytes, str | None]]


class StateSaver:
    """Writes the state of the applications ``applications()`` returns, as it changes."""

    def __init__(self, store: StateStore, applications: Callable[[], Iterable[Saved]]) -> None:
        self._store = store
        self._applications = applications
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ketch-state")
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Why each application's last write failed, until one succeeds: logged once.
        self._failing: dict[str, str] = {}

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._save_periodically())

    async def stop(self) -> None:
        """Write what changed since the last round, then stop the writer thread."""
        self._stopping.set()
        if self._task is not None:
            await self._task
        else:
            await self._save_round()
        self._writer.shutdown(wait=True)

    def save_now(self, application: Saved) -> None:
        """Write ``application``'s state if it changed, before returning (it is being
        removed: adding it back reads the file)."""
        pending = self._encode([application])
        if pending:
            self._report(pending, self._writer.submit(self._write, pending).result(), final=True)

    async def _save_periodically(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), SAVE_INTERVAL_S)
            try:
                await self._save_round()
            except Exception:  # never let one bad round end the saving
                log.exception("saving the policy state of the applications failed")

    async def _save_round(self) -> None:
        pending = self._encode(self._applications())
        if pending:
            failures = await asyncio.wrap_future(self._writer.submit(self._write, pending))
            self._report(pending, failures, final=self._stopping.is_set())

    def _encode(self, applications: Iterable[Saved]) -> _Pending:
        """In the loop: the state of each changed application, as its file's content."""
        pending: _Pending = []
        for application in applications:
            if not application.dirty:
                continue
            application.dirty = False
            applied = application.applied
            try:
                state = application.policy.state_dict()
                content = self._store.encode(application.spec, state, applied)
            except Exception:
                log.exception(
                    "the policy state of application %r cannot be saved", application.spec.name
                )
                continue
            pending.append((application, content, applied))
        return pending

    def _write(self, pending: _Pending) -> dict[int, str]:
        """In the writer thread: write each file; why each that failed did, by its index."""
        failures: dict[int, str] = {}
        for index, (application, content, applied) in enumerate(pending):
            try:
                self._store.write(application.spec.name, content, applied)
            except StateNotSaved as exc:
                failures[index] = str(exc)
        return failures

    def _report(self, pending: _Pending, failures: dict[int, str], final: bool) -> None:
        """In the loop: log what failed, and mark it to be written again; ``final`` when no
        round follows (the gateway stops, or the application is removed)."""
        for index, (application, _, _) in enumerate(pending):
            name = application.spec.name
            why = failures.get(index)
            if why is None:
                if self._failing.pop(name, None) is not None:
                    log.warning("the policy state of application %r is saved again", name)
            elif final:
                log.error("%s; what it learnt since its last save is lost", why)
            else:
                application.dirty = True
                if self._failing.get(name) != why:
                    self._failing[name] = why
                    log.error("%s; trying again every %g s", why, SAVE_INTERVAL_S)
