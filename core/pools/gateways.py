"""The gateways of one cluster, which find each other through the Redis of ``--state``.

Every second each gateway announces itself (``ketch:gateway:{ID}``, expiring after
:data:`ANNOUNCE_TTL_S` unless renewed): its broker's endpoint, its CURVE public key, and the
public key of the workers it starts. From the others' announcements it tells its broker which
peers its workers must join too (PEERS), and admits their workers' keys; so each worker joins
every gateway, and any gateway can send it batches.

One gateway at a time holds the **pools lease** (``ketch:pools:lease``, renewed every second,
lost :data:`LEASE_TTL_S` after its holder stops renewing it): that one runs every pool's
scaling decisions. The others (followers) start no workers; they publish their queues' load
(``ketch:pools:load``), which the holder adds to its own, so a request at a follower whose
pool is at zero cold-starts a worker at the holder, which then joins the follower. When the
holder goes, its workers go with it (a worker ends with its own gateway) and another gateway
takes the lease and starts what the load asks for. A holder that could not reach Redis for
longer than the lease and finds another holding it hands its workers over: it lets them go as
they become idle (:meth:`ketch.pools.scaling.PoolManager.lead`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import orjson
import redis
import redis.asyncio as aioredis

from ketch.applications.redis_streams import Outage
from ketch.pools.endpoints import dialable
from ketch.pools.scaling import RemoteLoad
from ketch.zmq_transport.protocol import PeerBroker

if TYPE_CHECKING:
    from ketch.serving.queue import ModelQueue

log = logging.getLogger("ketch.pools")

#: How often a gateway announces itself and renews the lease it holds.
ANNOUNCE_S = 1.0
#: How long an announcement lasts without renewal: a gateway silent this long is gone.
ANNOUNCE_TTL_S = 3.0
#: How long the pools lease outlives its holder's last renewal.
LEASE_TTL_S = 3.0
_PREFIX = "ketch:gateway:"
_LEASE = "ketch:pools:lease"
_LOAD = "ketch:pools:load"

#: Takes the lease if it is free, renews it if it is ours: 1 when we hold it after.
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Announcement:
    """What a gateway tells the others of itself."""

    gateway: str
    broker: str
    server_key: str | None
    worker_key: str | None

    def peer(self) -> PeerBroker:
        return PeerBroker(endpoint=self.broker, server_key=self.server_key)


class Coordinated(Protocol):
    """What the gateways' coordination drives in this gateway's pool manager."""

    def lead(self, leading: bool) -> None:
        """This gateway holds the pools lease (True) or another does."""

    def remote_load(self, pool: tuple[str, str], gateway: str, load: RemoteLoad) -> None:
        """A follower's load on ``pool`` changed."""

    def forget_gateways(self, alive: set[str]) -> None:
        """Only these gateways are left: the load of the others is gone with them."""

    def loads(self) -> list[ModelQueue]:
        """The queues whose load this follower shares."""


def reachable_endpoint(endpoint: str, redis_url: str) -> str:
    """The broker endpoint as other machines dial it: a wildcard host (``0.0.0.0``, ``*``)
    becomes the address this machine reaches Redis from (where the others are too)."""

    def route_to_redis() -> str:
        parts = urlsplit(redis_url)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            # No packet is sent: connecting a UDP socket only picks the route and its address.
            probe.connect((parts.hostname or "127.0.0.1", parts.port or 6379))
            return str(probe.getsockname()[0])

    return dialable(endpoint, route_to_redis)


class Gateways:
    """This gateway among the others of its cluster (see the module docstring).

    :param on_peers: given the other gateways' announcements whenever they change (the
        broker's PEERS, the worker keys it admits).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        me: Announcement,
        pools: Coordinated,
        on_peers: Callable[[list[Announcement]], None],
    ) -> None:
        self._client = client
        self.me = me
        self._pools = pools
        self._on_peers = on_peers
        self._hold = client.register_script(_HOLD)
        self._release = client.register_script(_RELEASE)
        self._others: list[Announcement] = []
        self.leading = False
        self._tasks: list[asyncio.Task[None]] = []
        #: Load messages on their way (each removes itself when sent).
        self._publishing: set[asyncio.Future[None]] = set()
        self._outage = Outage(log, "%s", "the gateways reach each other through Redis again")
        #: What each of this follower's pools last reported, so an unchanged one is not sent.
        self._reported: dict[tuple[str, str], tuple[int, float]] = {}

    async def start(self) -> None:
        """Announce this gateway and settle who holds the lease, before serving."""
        await self._round()
        self._tasks = [
            asyncio.create_task(self._announce_periodically(), name="ketch-gateways"),
            asyncio.create_task(self._hear_loads(), name="ketch-gateway-loads"),
        ]

    async def stop(self) -> None:
        for task in [*self._tasks, *self._publishing]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Gone at once rather than when the announcement and the lease expire.
        with contextlib.suppress(redis.RedisError):
            await self._release(keys=[_LEASE], args=[self.me.gateway])
            await self._client.delete(_PREFIX + self.me.gateway)

    def report(self, queue: ModelQueue) -> None:
        """As a follower: share ``queue``'s load with the lease holder now."""
        if self.leading:
            return
        key = queue.spec.key
        now = time.monotonic()
        load = (queue.active_requests, queue.last_request_at)
        if self._reported.get(key) == load:
            return
        self._reported[key] = load
        idle_s = now - queue.last_request_at
        message = {
            "gateway": self.me.gateway,
            "pool": list(key),
            "active": queue.active_requests,
            # None: no request yet (JSON has no infinity).
            "idle_s": max(0.0, idle_s) if math.isfinite(idle_s) else None,
        }
        task = asyncio.ensure_future(self._publish(orjson.dumps(message)))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, message: bytes) -> None:
        try:
            await self._client.publish(_LOAD, message)
        except redis.RedisError as exc:
            self._outage.failed(f"cannot share this gateway's load: {exc}")

    async def _announce_periodically(self) -> None:
        while True:
            await asyncio.sleep(ANNOUNCE_S)  # the announcement's period, not a wait for a peer
            try:
                await self._round()
            except Exception:  # one bad round must not end the announcing
                log.exception("announcing this gateway to the others failed")

    async def _round(self) -> None:
        me = self.me
        announcement = orjson.dumps(
            {"broker": me.broker, "server_key": me.server_key, "worker_key": me.worker_key}
        )
        try:
            await self._client.set(
                _PREFIX + me.gateway, announcement, px=int(ANNOUNCE_TTL_S * 1000)
            )
            others = await self._read_others()
            held = await self._hold(keys=[_LEASE], args=[me.gateway, int(LEASE_TTL_S * 1000)])
        except redis.RedisError as exc:
            # Each keeps its part until Redis is back: a holder that cannot renew its lease
            # goes on scaling (another may take over once the lease expires in Redis).
            self._outage.failed(f"cannot reach the other gateways through Redis: {exc}")
            return
        self._outage.worked()
        if others != self._others:
            self._others = others
            self._pools.forget_gateways({a.gateway for a in others})
            self._on_peers(others)
        leading = bool(held)
        if leading != self.leading:
            self.leading = leading
            log.info("this gateway %s the pools' scaling", "runs" if leading else "no longer runs")
            self._pools.lead(leading)
        if not leading:
            for queue in self._pools.loads():
                self.report(queue)

    async def _read_others(self) -> list[Announcement]:
        keys = [key async for key in self._client.scan_iter(match=_PREFIX + "*", count=100)]
        names = sorted(k for k in keys if _name(k) != self.me.gateway)
        values = await self._client.mget(names) if names else []
        found = []
        for key, value in zip(names, values, strict=True):
            if value is None:
                continue  # expired between the scan and the read
            try:
                fields: dict[str, Any] = orjson.loads(value)
                found.append(
                    Announcement(
                        _name(key), fields["broker"], fields["server_key"], fields["worker_key"]
                    )
                )
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.warning("ignoring a malformed gateway announcement at %s", key)
        return found

    async def _hear_loads(self) -> None:
        """The followers' loads, for the lease holder (the others hear them and drop them)."""
        while True:
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(_LOAD)
                    async for message in pubsub.listen():
                        if message.get("type") == "message" and self.leading:
                            self._heard(message["data"])
            except redis.RedisError as exc:
                self._outage.failed(f"cannot hear the other gateways' load: {exc}")
                await asyncio.sleep(ANNOUNCE_S)  # a pause before trying Redis again

    def _heard(self, data: bytes) -> None:
        try:
            fields = orjson.loads(data)
            gateway = str(fields["gateway"])
            name, version = fields["pool"]
            idle_s = fields["idle_s"]
            last_request_at = -math.inf if idle_s is None else time.monotonic() - float(idle_s)
            load = RemoteLoad(int(fields["active"]), last_request_at)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed load message")
            return
        if gateway != self.me.gateway:
            self._pools.remote_load((str(name), str(version)), gateway, load)


def _name(key: bytes | str) -> str:
    text = key.decode() if isinstance(key, bytes) else key
    return text.removeprefix(_PREFIX)
