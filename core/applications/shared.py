"""Applications' state shared by several gateways through Redis (``--state redis://HOST:PORT/DB``).

Three things live in Redis, each under the application's own keys (``ketch:app:{NAME}:...``,
the braces a Redis Cluster hash tag, so one application's keys share a slot):

* **the queries answered**, for their feedback (:class:`RedisQueries`): every gateway writes
  the ones it answers, within the application's count and byte bounds (one Lua script keeps
  both, oldest out first), so feedback may go to any gateway; the first feedback for a query
  claims it (``HSETNX``), so a second one is a 409 wherever it arrives;
* **the feedback itself**, as a stream (:class:`FeedbackLog`): the gateway that takes a
  feedback appends it, and every gateway, that one too, reads the stream and teaches its own
  policy from it in the stream's order. Each policy is thus the same function of the same
  feedback; the gateway that took it answers its client once its own policy has learnt it;
* **the policy's state** (:class:`RedisStateStore`), written about once a second by each
  gateway with the stream position it includes; a write never replaces a newer one. A
  gateway that starts loads it and reads the stream from there on.

What a policy learns from mirrored models (``compare``) stays in the gateway that served
the query: only feedback is shared.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from ketch.applications.memory import AnsweredQuery
from ketch.applications.redis_streams import Outage, read_streams
from ketch.applications.state import (
    SavedState,
    SharedStateError,
    StateNotSaved,
    decode_saved,
    encode_saved,
)
from ketch.policy import Feedback, Query
from ketch.specs.apps import AppSpec

log = logging.getLogger("ketch.apps")

#: Feedback entries a stream keeps (about; Redis trims whole nodes): a gateway that starts
#: with a policy state older than the oldest of them has missed some.
STREAM_LENGTH = 100_000
_JSON = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS

_REMEMBER = """
local records, sizes, order, claims, total = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, nbytes = ARGV[1], tonumber(ARGV[3])
local max_queries, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local previous = redis.call('HGET', sizes, id)
if previous then
  redis.call('DECRBY', total, previous)
else
  redis.call('RPUSH', order, id)
end
redis.call('HSET', records, id, ARGV[2])
redis.call('HSET', sizes, id, nbytes)
local bytes = redis.call('INCRBY', total, nbytes)
local count = redis.call('LLEN', order)
while count > 0 and (count > max_queries or bytes > max_bytes) do
  local oldest = redis.call('LPOP', order)
  bytes = redis.call('DECRBY', total, tonumber(redis.call('HGET', sizes, oldest) or '0'))
  redis.call('HDEL', records, oldest)
  redis.call('HDEL', sizes, oldest)
  redis.call('HDEL', claims, oldest)
  count = count - 1
end
return {count, bytes}
"""

#: Replaces the saved state unless the one there includes more of the stream.
_SAVE = """
local saved = redis.call('HGET', KEYS[1], 'applied')
if saved then
  local a_ms, a_seq = string.match(saved, '(%d+)-(%d+)')
  local b_ms, b_seq = string.match(ARGV[1], '(%d+)-(%d+)')
  a_ms, a_seq, b_ms, b_seq = tonumber(a_ms), tonumber(a_seq), tonumber(b_ms), tonumber(b_seq)
  if a_ms > b_ms or (a_ms == b_ms and a_seq > b_seq) then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'applied', ARGV[1], 'content', ARGV[2])
return 1
"""


def _as_bytes(value: bytes | str) -> bytes:
    """What redis-py answers (bytes, since no client here decodes), as its stubs cannot say."""
    return value.encode() if isinstance(value, str) else value


def _key(app: str, what: str) -> str:
    return f"ketch:app:{{{app}}}:{what}"


@dataclass(frozen=True, slots=True)
class SharedState:
    """The connection to the Redis that several gateways share, and this gateway's id in it."""

    url: str
    client: aioredis.Redis
    #: For the policy state, which the saver writes from its thread.
    sync_client: redis.Redis
    gateway: str

    @classmethod
    async def connect(cls, url: str) -> SharedState:
        """Connect and check that Redis answers; raises :class:`SharedStateError`."""
        try:
            client = aioredis.Redis.from_url(url)
            sync_client = redis.Redis.from_url(url)
        except ValueError as exc:
            raise SharedStateError(f"--state {url}: {exc}") from None
        try:
            await client.ping()
        except redis.RedisError as exc:
            await client.aclose()
            sync_client.close()
            raise SharedStateError(f"--state {url}: Redis does not answer: {exc}") from None
        return cls(url, client, sync_client, secrets.token_hex(6))

    async def close(self) -> None:
        await self.client.aclose()
        self.sync_client.close()

    def state_store(self) -> RedisStateStore:
        return RedisStateStore(self)

    def queries(self, app: str, max_queries: int, max_bytes: int) -> RedisQueries:
        return RedisQueries(self, app, max_queries, max_bytes)

    def feedback_log(self, teach: Teach) -> FeedbackLog:
        return FeedbackLog(self, teach)


class RedisStateStore:
    """Policies' state in Redis (the :class:`~ketch.applications.state.StateStore` of
    ``--state redis://``)."""

    def __init__(self, shared: SharedState) -> None:
        self._shared = shared
        self._save = shared.sync_client.register_script(_SAVE)

    def where(self, app_name: str) -> str:
        return f"{self._shared.url} key {_key(app_name, 'state')}"

    def load(self, spec: AppSpec) -> SavedState | None:
        try:
            saved = self._shared.sync_client.hgetall(_key(spec.name, "state"))
        except redis.RedisError as exc:
            raise SharedStateError(
                f"the policy state of application {spec.name!r} cannot be read from "
                f"{self.where(spec.name)}: {exc}"
            ) from None
        if not saved:
            return None
        decoded, why = decode_saved(_as_bytes(saved.get(b"content", b"")), spec)
        if decoded is None:
            self.set_aside(spec.name, why)
        return decoded

    def set_aside(self, app_name: str, why: str) -> None:
        key = _key(app_name, "state")
        log.warning("not loading the policy state in %s: %s; renamed to %s:stale", key, why, key)
        try:
            self._shared.sync_client.rename(key, f"{key}:stale")
        except redis.RedisError:
            pass

    def encode(self, spec: AppSpec, state: dict[str, Any], applied: str | None) -> bytes:
        return encode_saved(spec, state, applied)

    def write(self, app_name: str, content: bytes, applied: str | None) -> None:
        try:
            self._save(keys=[_key(app_name, "state")], args=[applied or "0-0", content])
        except redis.RedisError as exc:
            raise StateNotSaved(
                f"the policy state of application {app_name!r} was not saved to "
                f"{self.where(app_name)}: {exc}"
            ) from exc


class RedisQueries:
    """One application's answered queries, kept in Redis for every gateway's feedback."""

    def __init__(self, shared: SharedState, app: str, max_queries: int, max_bytes: int) -> None:
        self._client = shared.client
        self._app = app
        self._keys = [_key(app, k) for k in ("queries", "sizes", "order", "claims", "bytes")]
        self._remember = shared.client.register_script(_REMEMBER)
        self._bounds = (max_queries, max_bytes)
        self._held = (0, 0)
        self._background: set[asyncio.Future[Any]] = set()
        named = app.replace("%", "%%")  # the messages are logging's formats
        self._outage = Outage(
            log,
            f"application {named!r}: the queries it answers are not kept for feedback "
            "(Redis: %s); feedback for them will be a 404",
            f"application {named!r}: queries are kept in Redis again",
        )

    async def remember(self, answered: AnsweredQuery) -> None:
        answered.kept = True
        await self._write(answered)

    def grew(self, answered: AnsweredQuery, nbytes: int) -> None:
        task = asyncio.ensure_future(self._write(answered))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write(self, answered: AnsweredQuery) -> None:
        record = orjson.dumps(_record_of(answered), option=_JSON)
        try:
            count, nbytes = await self._remember(
                keys=self._keys, args=[answered.query.id, record, answered.size(), *self._bounds]
            )
        except redis.RedisError as exc:
            self._outage.failed(str(exc))  # the answer still goes out: serving comes first
            return
        self._outage.worked()
        self._held = (int(count), int(nbytes))

    async def recall(self, query_id: str) -> AnsweredQuery | None:
        record = await self._command("read a query", self._client.hget(self._keys[0], query_id))
        return None if record is None else _answered_of(orjson.loads(record))

    async def claim(self, answered: AnsweredQuery) -> bool:
        claims = self._keys[3]
        claimed = await self._command(
            "claim a feedback", self._client.hsetnx(claims, answered.query.id, 1)
        )
        return bool(claimed)

    async def _command(self, what: str, command: Any) -> Any:
        try:
            return await command
        except redis.RedisError as exc:
            raise SharedStateError(
                f"application {self._app!r} cannot {what} in Redis: {exc}"
            ) from None

    def bound(self, max_queries: int, max_bytes: int) -> None:
        self._bounds = (max_queries, max_bytes)

    def held(self) -> tuple[int, int]:
        return self._held


def _record_of(answered: AnsweredQuery) -> dict[str, Any]:
    query = answered.query
    return {
        "query": {"id": query.id, "app": query.app, "input": query.input, "notes": query.notes},
        "predictions": answered.predictions,
        "used": answered.used,
        "output": answered.output,
        "default": answered.default,
    }


def _answered_of(record: dict[str, Any]) -> AnsweredQuery:
    query = record["query"]
    return AnsweredQuery(
        Query(query["id"], query["app"], query["input"], query["notes"]),
        predictions=record["predictions"],
        used=record["used"],
        output=record["output"],
        default=record["default"],
        kept=True,
    )


#: Teaches one application's policy (if this gateway serves it) a feedback entry at a stream
#: position.
Teach = Callable[[str, Query, Feedback, str], None]


class FeedbackLog:
    """The applications' feedback as Redis streams: appended by the gateway that takes it,
    read by every gateway in order (:meth:`follow`)."""

    def __init__(self, shared: SharedState, teach: Teach) -> None:
        self._shared = shared
        self._teach = teach
        #: Each followed application's position in its stream.
        self._positions: dict[str, str] = {}
        #: This gateway's own entries not yet taught, by stream id.
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._outage = Outage(
            log,
            "the applications' feedback cannot be read from Redis (%s)",
            "the applications' feedback is read from Redis again",
        )
        self._followed = asyncio.Event()

    def follow(self, app: str, since: str | None) -> None:
        """Read ``app``'s feedback from after ``since`` (its saved state's), or all of it."""
        self._positions[app] = since or "0-0"
        self._followed.set()

    def unfollow(self, app: str) -> None:
        self._positions.pop(app, None)

    async def publish(self, query: Query, feedback: Feedback) -> None:
        """Append a feedback, and return once this gateway's policy has learnt it; raises
        what the policy raised, or :class:`SharedStateError`."""
        # Typed loosely: redis-py's stubs want one union for every field.
        entry: Any = {
            "gateway": self._shared.gateway,
            "query": orjson.dumps(
                {"id": query.id, "app": query.app, "input": query.input, "notes": query.notes},
                option=_JSON,
            ),
            "feedback": orjson.dumps(
                {
                    "reward": feedback.reward,
                    "label": feedback.label,
                    "output": feedback.output,
                    "predictions": feedback.predictions,
                    "rewards": feedback.rewards,
                },
                option=_JSON,
            ),
        }
        try:
            added = await self._shared.client.xadd(
                _key(query.app, "feedback"), entry, maxlen=STREAM_LENGTH, approximate=True
            )
        except redis.RedisError as exc:
            raise SharedStateError(
                f"application {query.app!r}: the feedback could not be shared in Redis: {exc}"
            ) from None
        stream_id = _as_bytes(added).decode()
        taught = self._waiting.setdefault(stream_id, asyncio.get_running_loop().create_future())
        try:
            await taught
        finally:
            self._waiting.pop(stream_id, None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._read(), name="ketch-feedback-log")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _read(self) -> None:
        while True:
            if not self._positions:
                self._followed.clear()
                await self._followed.wait()
                continue
            streams = {_key(app, "feedback"): at for app, at in self._positions.items()}
            for stream, stream_id, fields in await read_streams(
                self._shared.client, streams, 256, self._outage
            ):
                self._apply(stream.split("{", 1)[1].split("}", 1)[0], stream_id, fields)

    def _apply(self, app: str, stream_id: str, fields: dict[bytes, bytes]) -> None:
        if app in self._positions:
            self._positions[app] = stream_id
        waiting = self._waiting.get(stream_id)
        if waiting is None and fields.get(b"gateway") == self._shared.gateway.encode():
            # Ours, appended before its publish() began waiting: it waits for this id too.
            waiting = self._waiting.setdefault(
                stream_id, asyncio.get_running_loop().create_future()
            )
        try:
            query = orjson.loads(fields[b"query"])
            given = orjson.loads(fields[b"feedback"])
            self._teach(
                app,
                Query(query["id"], query["app"], query["input"], query["notes"]),
                Feedback(
                    given["reward"],
                    given["label"],
                    given["output"],
                    given["predictions"],
                    given["rewards"],
                ),
                stream_id,
            )
        except Exception as exc:
            if waiting is not None and not waiting.done():
                waiting.set_exception(exc)
            elif waiting is None:
                log.error("application %r: feedback %s not learnt: %s", app, stream_id, exc)
            return
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
