"""Prefix-cache metadata in Redis: model replicas publish which page hashes they hold, routers ask.

Layout, under `{key_prefix}:{model_key}`:
    ...:pages:{replica}      SET of the page hashes the replica holds in its device KV cache
    ...:hostpages:{replica}  SET of those it holds in its host-memory tier (the tiers overlap)
    ...:load:{replica}       HASH of the replica's load figures (LLMEngine.load_figures), and
                             `at_ms`, when the engine counted them
The keys carry a TTL that the replica's heartbeat renews, so a dead replica's entries vanish on
their own; a (re)starting replica deletes its keys first. A lookup is one pipelined round trip:
SMISMEMBER of the request's hash chain against each candidate's two sets, and its load; the
leading pages held in either tier are the prefix that replica could reuse.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from deployments.config import RedisSettings
from worker.wire import PageEvent, PageTier

logger = logging.getLogger(__name__)


def pages_key(settings: RedisSettings, model_key: str, replica: str,
              tier: PageTier = "device") -> str:
    name = "pages" if tier == "device" else "hostpages"
    return f"{settings.key_prefix}:{model_key}:{name}:{replica}"


def load_key(settings: RedisSettings, model_key: str, replica: str) -> str:
    return f"{settings.key_prefix}:{model_key}:load:{replica}"


def _client(settings: RedisSettings) -> aioredis.Redis:
    timeout = max(settings.lookup_timeout_ms / 1000, 0.5)
    return aioredis.Redis.from_url(settings.url, socket_timeout=timeout,
                                   socket_connect_timeout=timeout, decode_responses=True)


class _OnceLogger:
    """Logs a failure once per outage, and the recovery once."""

    def __init__(self, what: str):
        self.what = what
        self.failing = False

    def failed(self, exc: BaseException) -> None:
        if not self.failing:
            logger.warning("%s: redis unavailable (%r); continuing without it", self.what, exc)
        self.failing = True

    def recovered(self) -> None:
        if self.failing:
            logger.info("%s: redis is back", self.what)
        self.failing = False


class PrefixIndexPublisher:
    """Batches a replica's page events into Redis off the token path.

    `on_page_event` is the engine's listener: it runs on the engine thread and only appends to a
    deque. A task on the replica's event loop flushes the deque and the replica's load figures
    every `flush_interval_ms` in one pipeline (routers weigh the load, so it must be fresh), and
    at once when `publish_soon` asks (a request finished: a client's next turn must not find
    the replica still loaded with it), and renews the TTLs every `heartbeat_s`. After Redis was
    unreachable the replica's sets are rebuilt from a snapshot of its cache, since the events
    missed meanwhile are gone.
    """

    def __init__(self, settings: RedisSettings, model_key: str, replica: str):
        self.settings = settings
        self.pages_keys = {tier: pages_key(settings, model_key, replica, tier)
                           for tier in ("device", "host")}
        self.load_key = load_key(settings, model_key, replica)
        self._events: deque[PageEvent] = deque()
        self._events_lock = threading.Lock()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._needs_resync = True  # the first flush replaces whatever a predecessor left
        self._flush_now = asyncio.Event()
        self._log = _OnceLogger(f"prefix index publisher {replica}")

    def publish_soon(self) -> None:  # the replica's event loop
        """Flushes now rather than at the end of the interval."""
        self._flush_now.set()

    def on_page_event(self, event: PageEvent) -> None:  # engine thread
        with self._events_lock:
            self._events.append(event)

    def take_snapshot(self, hashes: dict[PageTier, list[str]]
                      ) -> dict[PageTier, list[str]]:  # engine thread
        """Drops queued events: the snapshot taken at the same instant supersedes them."""
        with self._events_lock:
            self._events.clear()
        return hashes

    def start(self, snapshot: Callable[[], Awaitable[dict[PageTier, list[str]]]],
              load: Callable[[], Awaitable[dict[str, int]]]) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(snapshot, load))

    async def stop(self) -> None:
        if self._task is None:
            return
        self._stopping = True  # a cancellation that redis-py turns into an error still stops
        self._task.cancel()
        try:
            await asyncio.wait_for(self._task, timeout=5)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            pass

    async def _run(self, snapshot, load) -> None:
        client = _client(self.settings)
        interval = self.settings.flush_interval_ms / 1000
        renewed_at = -math.inf
        try:
            while not self._stopping:
                self._flush_now.clear()
                try:
                    if self._needs_resync:
                        await self._resync(client, await snapshot())
                        self._needs_resync = False
                    renew = time.monotonic() - renewed_at >= self.settings.heartbeat_s
                    await self._flush(client, await load(), renew=renew)
                    if renew:
                        renewed_at = time.monotonic()
                    self._log.recovered()
                except (RedisError, OSError, asyncio.TimeoutError) as exc:
                    self._log.failed(exc)
                    self._needs_resync = True
                try:
                    await asyncio.wait_for(self._flush_now.wait(), interval)
                except asyncio.TimeoutError:
                    pass
        finally:
            await client.aclose()

    async def _resync(self, client: aioredis.Redis, snapshot: dict[PageTier, list[str]]
                      ) -> None:
        pipe = client.pipeline(transaction=True)
        for tier, key in self.pages_keys.items():
            hashes = snapshot.get(tier, [])
            pipe.delete(key)
            for start in range(0, len(hashes), 4096):
                pipe.sadd(key, *hashes[start:start + 4096])
            pipe.expire(key, int(self.settings.ttl_s))
        await pipe.execute()

    async def _flush(self, client: aioredis.Redis, load: dict[str, int], renew: bool) -> None:
        with self._events_lock:
            events = list(self._events)
            self._events.clear()
        pipe = client.pipeline(transaction=False)
        for event in events:
            key = self.pages_keys[event.tier]
            if event.kind == "stored":
                pipe.sadd(key, *event.hashes)
            else:
                pipe.srem(key, *event.hashes)
        pipe.hset(self.load_key, mapping=load)
        if renew or events:  # a key created by this flush needs its TTL at once
            ttl = int(self.settings.ttl_s)
            for key in (*self.pages_keys.values(), self.load_key):
                pipe.expire(key, ttl)
        try:
            await pipe.execute()
        except BaseException:
            with self._events_lock:  # keep them for the resync's snapshot to supersede
                self._events.extendleft(reversed(events))
            raise


@dataclass
class ReplicaView:
    """What a router knows of one replica for one request: the request's leading prefix pages
    it holds, by the best tier each is in, and its latest load figures (empty if unknown)."""

    device_pages: int = 0
    host_pages: int = 0
    load: dict[str, int] = field(default_factory=dict)

    @property
    def pages(self) -> int:
        return self.device_pages + self.host_pages


class PrefixIndexLookup:
    """The router's side: which leading pages of a request each replica holds, and its load."""

    def __init__(self, settings: RedisSettings, model_key: str):
        self.settings = settings
        self.model_key = model_key
        self._client: aioredis.Redis | None = None  # made on the router's event loop
        self._log = _OnceLogger("prefix-aware router")

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            self._client = _client(self.settings)
        return self._client

    async def lookup(self, replicas: Sequence[str],
                     page_hashes: Sequence[str]) -> dict[str, ReplicaView] | None:
        """replica -> its view; None if Redis did not answer within the timeout."""
        pipe = self._redis().pipeline(transaction=False)
        for replica in replicas:
            if page_hashes:
                for tier in ("device", "host"):
                    pipe.smismember(pages_key(self.settings, self.model_key, replica, tier),
                                    list(page_hashes))
            pipe.hgetall(load_key(self.settings, self.model_key, replica))
        try:
            replies = await asyncio.wait_for(pipe.execute(),
                                             self.settings.lookup_timeout_ms / 1000)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._log.failed(exc)
            return None
        self._log.recovered()
        per_replica = 3 if page_hashes else 1
        views = {}
        for index, replica in enumerate(replicas):
            *members, load = replies[index * per_replica:(index + 1) * per_replica]
            view = ReplicaView(load={f: int(v) for f, v in load.items()})
            for in_device, in_host in zip(*members):
                if in_device:
                    view.device_pages += 1
                elif in_host:
                    view.host_pages += 1
                else:
                    break
            views[replica] = view
        return views

    async def replica_loads(self) -> dict[str, dict[str, int]] | None:
        """Every live replica's published load figures (for /metrics); None without Redis."""
        prefix = load_key(self.settings, self.model_key, "")
        try:
            keys = [k async for k in self._redis().scan_iter(match=prefix + "*", count=100)]
            pipe = self._redis().pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            values = await pipe.execute()
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._log.failed(exc)
            return None
        return {k.removeprefix(prefix): {f: int(v) for f, v in h.items()}
                for k, h in zip(keys, values) if h}

