"""The management API's changes shared by the gateways of one Redis (``--state``).

One stream, :data:`STREAM`, holds every change any gateway took (a model or application
added, changed or removed, a pool's bounds, a roll, a repository load or unload: the
:data:`~ketch.http.admin_changes.Change` s). Each gateway reads it from the start and applies
every entry in the stream's order, its own too: the gateway that took a request answers once
it has applied it, with what applying it gave there. So every gateway makes the same changes
in the same order, and the state each change meets is the same everywhere: a change refused
at one (a model already served: 409) is refused at all.

A gateway that starts applies the whole log after its served file, before it says ready, so
it serves what the gateways before it serve. The log lasts as long as the Redis database: the
cluster's changes outlive any one gateway, and a restart of all of them serves them again
(``ketch serve --gateways N`` empties its private Redis's log when it starts, as a lone
gateway's changes end with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec
import redis

from ketch.applications.redis_streams import Outage, read_streams
from ketch.applications.shared import SharedState
from ketch.http.admin_changes import Change, Changes, decode_change, encode_change
from ketch.serving.jobs import PredictionError

log = logging.getLogger("ketch.admin")

STREAM = "ketch:admin:changes"
#: The longest a gateway waits to apply the change it appended (Redis may be gone meanwhile).
APPLY_TIMEOUT_S = 120.0


class SharedChanges:
    """This gateway's reading of the changes log, and its way to append to it (see the
    module's docstring); applies through ``changes``."""

    def __init__(self, shared: SharedState, changes: Changes) -> None:
        self._client = shared.client
        self._gateway = shared.gateway
        self._changes = changes
        self._position = "0-0"
        #: What applying this gateway's own entries gave, by stream id, until taken.
        self._outcomes: dict[str, asyncio.Future[Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._outage = Outage(
            log,
            "cannot read the management changes from Redis: %s",
            "the management changes are read from Redis again",
        )

    async def catch_up(self) -> int:
        """Apply every change the log holds now; how many there were. Raises
        :class:`redis.RedisError` when Redis does not answer (the server does not start)."""
        applied = 0
        while entries := await self._read(outage=None):
            for stream_id, fields in entries:
                await self._apply(stream_id, fields)
                applied += 1
        return applied

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="ketch-admin-changes")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for outcome in self._outcomes.values():
            outcome.cancel()

    async def submit(self, change: Change) -> Any:
        entry: Any = {"gateway": self._gateway, "change": encode_change(change)}
        try:
            added = await self._client.xadd(STREAM, entry)
        except redis.RedisError as exc:
            raise PredictionError(
                503, f"the change could not be shared with the other gateways in Redis: {exc}"
            ) from None
        stream_id = added.decode() if isinstance(added, bytes) else str(added)
        outcome = self._outcome(stream_id)
        try:
            return await asyncio.wait_for(asyncio.shield(outcome), APPLY_TIMEOUT_S)
        except TimeoutError:
            raise PredictionError(
                503,
                f"the change is in Redis's log ({STREAM} {stream_id}) but this gateway could "
                f"not read it back within {APPLY_TIMEOUT_S:g} s: it applies when Redis answers",
            ) from None
        finally:
            self._outcomes.pop(stream_id, None)

    def _outcome(self, stream_id: str) -> asyncio.Future[Any]:
        # Either side may come first: the reader can apply an entry before its xadd returns.
        return self._outcomes.setdefault(stream_id, asyncio.get_running_loop().create_future())

    async def _follow(self) -> None:
        while True:
            for stream_id, fields in await self._read(self._outage):
                await self._apply(stream_id, fields)

    async def _read(self, outage: Outage | None) -> list[tuple[str, dict[bytes, bytes]]]:
        read = await read_streams(self._client, {STREAM: self._position}, 64, outage)
        if read:
            self._position = read[-1][1]
        return [(stream_id, fields) for _, stream_id, fields in read]

    async def _apply(self, stream_id: str, fields: dict[bytes, bytes]) -> None:
        own = fields.get(b"gateway", b"").decode() == self._gateway
        try:
            change = decode_change(fields[b"change"])
        except (KeyError, msgspec.DecodeError) as exc:
            log.warning("ignoring a malformed management change %s: %s", stream_id, exc)
            return
        try:
            result = await self._changes.apply(change)
        except Exception as exc:
            if own:
                self._outcome(stream_id).set_exception(exc)
            elif isinstance(exc, PredictionError):
                # Refused here as at the gateway that took it (the same state everywhere).
                log.info("a %s change was refused: %s", type(change).__name__, exc)
            else:
                log.exception("applying the management change %s failed", stream_id)
            return
        if own:
            self._outcome(stream_id).set_result(result)
