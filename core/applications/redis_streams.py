"""Redis as the gateways that share one use it: streams followed one blocking read at a time
(the feedback of their applications, their management changes), and a Redis that stops
answering said once when it starts failing and once when it answers again (:class:`Outage`:
for those reads, and for the queries kept and the load shared), never once per attempt."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio as aioredis

#: How long one read of the streams blocks before it is made again (so that streams followed
#: since are read too).
READ_BLOCK_MS = 1000

#: One entry read: its stream, its id, its fields.
Entry = tuple[str, str, dict[bytes, bytes]]


class Outage:
    """Whether reading from Redis fails, logged on ``log`` at each change: ``failing`` (with
    ``%s``, the error) when it starts failing or fails otherwise, ``again`` once it works."""

    def __init__(self, log: logging.Logger, failing: str, again: str) -> None:
        self._log = log
        self._messages = (failing, again)
        self._failing: str | None = None

    def failed(self, why: str) -> None:
        if self._failing != why:
            self._failing = why
            self._log.error(self._messages[0], why)

    def worked(self) -> None:
        if self._failing is not None:
            self._failing = None
            self._log.warning(self._messages[1])


async def read_streams(
    client: aioredis.Redis, positions: Mapping[str, str], count: int, outage: Outage | None
) -> list[Entry]:
    """The entries after each stream's position (``{stream: id}``), in the streams' order,
    waiting up to :data:`READ_BLOCK_MS` for one. With an ``outage``, a failure of Redis is
    said there and, after a pause before the next try, reads as no entry; without one (a read
    that must succeed, at start), it raises :class:`redis.RedisError`."""
    try:
        block = READ_BLOCK_MS if outage is not None else None
        streams: Any = dict(positions)  # redis-py's stubs want one union for keys and ids
        read: Any = await client.xread(streams, count=count, block=block)
    except redis.RedisError as exc:
        if outage is None:
            raise
        outage.failed(str(exc))
        await asyncio.sleep(READ_BLOCK_MS / 1000)  # a pause before trying Redis again
        return []
    if outage is not None:
        outage.worked()
    return [
        (stream.decode(), stream_id.decode(), fields)
        for stream, found in read or []
        for stream_id, fields in found
    ]
