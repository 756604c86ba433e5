"""The Redis prefix index against a real redis-server: publish, look up, expire, resync."""

from __future__ import annotations

import asyncio

import pytest

from deployments.config import RedisSettings
from deployments.local import LocalRedis
from deployments.prefix_index import PrefixIndexLookup, PrefixIndexPublisher, pages_key
from worker.ports import free_port
from worker.wire import PageEvent


@pytest.fixture
def redis_server():
    server = LocalRedis.start()
    yield server
    server.stop()


def _settings(url: str, **overrides) -> RedisSettings:
    values = dict(url=url, heartbeat_s=0.2, ttl_s=1, flush_interval_ms=10, lookup_timeout_ms=200)
    values.update(overrides)
    return RedisSettings(**values)


async def _until(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


class FakeReplica:
    """The engine side of a publisher: sets of cached hashes, by tier, that change by events."""

    def __init__(self, publisher: PrefixIndexPublisher):
        self.publisher = publisher
        self.cached: dict[str, set[str]] = {"device": set(), "host": set()}
        self.running = 1

    def store(self, *hashes: str, tier: str = "device") -> None:
        self.cached[tier].update(hashes)
        self.publisher.on_page_event(PageEvent("stored", hashes, tier))

    def remove(self, *hashes: str, tier: str = "device") -> None:
        self.cached[tier].difference_update(hashes)
        self.publisher.on_page_event(PageEvent("removed", hashes, tier))

    def start(self) -> None:
        async def snapshot():
            return self.publisher.take_snapshot({t: sorted(h) for t, h in self.cached.items()})

        async def load():
            return {"running": self.running, "waiting": 0,
                    "kv_pages_in_use": len(self.cached["device"]),
                    "kv_pages_total": 8}

        self.publisher.start(snapshot, load)


def test_lookup_counts_leading_pages_per_replica(redis_server):
    async def scenario():
        settings = _settings(redis_server.url)
        a = FakeReplica(PrefixIndexPublisher(settings, "m", "replica-a"))
        b = FakeReplica(PrefixIndexPublisher(settings, "m", "replica-b"))
        a.start()
        b.start()
        a.store("h1", "h2", "h3")
        b.store("h1", "h3")  # h2 missing: only one leading page counts
        lookup = PrefixIndexLookup(settings, "m")

        await _until(lambda: _equals(lookup, ["replica-a", "replica-b", "replica-c"],
                                     ["h1", "h2", "h3", "h4"],
                                     {"replica-a": (3, 0), "replica-b": (1, 0),
                                      "replica-c": (0, 0)}))
        a.remove("h2")
        await _until(lambda: _equals(lookup, ["replica-a"], ["h1", "h2"], {"replica-a": (1, 0)}))
        # Evicted to the host tier: still part of the prefix, counted in its tier; a page in
        # both tiers counts as on the device.
        a.store("h2", "h3", tier="host")
        await _until(lambda: _equals(lookup, ["replica-a"], ["h1", "h2", "h3"],
                                     {"replica-a": (2, 1)}))
        expected_load = {"running": 1, "waiting": 0, "kv_pages_in_use": 2, "kv_pages_total": 8}

        async def load_published():
            views = await lookup.lookup(["replica-a"], ["h1"])
            return (await lookup.replica_loads()).get("replica-a") == expected_load \
                == views["replica-a"].load

        await _until(load_published)
        await a.publisher.stop()
        await b.publisher.stop()

    asyncio.run(scenario())


def test_a_finished_request_is_published_before_the_interval_ends(redis_server):
    """`publish_soon` (a request finished) flushes the load at once, not a flush interval later:
    routers must not find the replica still busy with it when the client's next turn comes."""
    async def scenario():
        settings = _settings(redis_server.url, flush_interval_ms=60_000)
        a = FakeReplica(PrefixIndexPublisher(settings, "m", "replica-a"))
        a.start()
        lookup = PrefixIndexLookup(settings, "m")

        async def running(count):
            return (await lookup.replica_loads()).get("replica-a", {}).get("running") == count

        await _until(lambda: running(1))  # the first flush, at start
        a.running = 0
        await asyncio.sleep(0.2)
        assert await running(1), "flushed before the interval ended, unasked"
        a.publisher.publish_soon()
        await _until(lambda: running(0), timeout_s=1.0)
        await a.publisher.stop()

    asyncio.run(scenario())


async def _equals(lookup, replicas, hashes, expected) -> bool:
    """expected: replica -> (leading pages on its device, then in its host tier)."""
    views = await lookup.lookup(replicas, hashes)
    return {r: (v.device_pages, v.host_pages) for r, v in views.items()} == expected


def test_dead_replica_entries_expire_and_restart_clears_them(redis_server):
    async def scenario():
        settings = _settings(redis_server.url)
        lookup = PrefixIndexLookup(settings, "m")
        a = FakeReplica(PrefixIndexPublisher(settings, "m", "replica-a"))
        a.start()
        a.store("h1")
        await _until(lambda: _equals(lookup, ["replica-a"], ["h1"], {"replica-a": (1, 0)}))
        await a.publisher.stop()  # the replica dies: no more heartbeats
        await _until(lambda: _equals(lookup, ["replica-a"], ["h1"], {"replica-a": (0, 0)}),
                     timeout_s=settings.ttl_s + 3)

        # A replica restarting under the same id starts from an empty set, not stale entries.
        client = lookup._client
        await client.sadd(pages_key(settings, "m", "replica-a"), "stale")
        fresh = FakeReplica(PrefixIndexPublisher(settings, "m", "replica-a"))
        fresh.start()
        fresh.store("h9")
        await _until(lambda: _equals(lookup, ["replica-a"], ["h9"], {"replica-a": (1, 0)}))
        assert not await client.sismember(pages_key(settings, "m", "replica-a"), "stale")
        await fresh.publisher.stop()

    asyncio.run(scenario())


def test_lookup_without_redis_says_so_quickly_and_publisher_resyncs_when_it_returns():
    async def scenario():
        port = free_port()
        settings = _settings(f"redis://127.0.0.1:{port}/0", lookup_timeout_ms=5)
        lookup = PrefixIndexLookup(settings, "m")
        started = asyncio.get_running_loop().time()
        assert await lookup.lookup(["replica-a"], ["h1"]) is None
        assert asyncio.get_running_loop().time() - started < 1.0
        assert await lookup.replica_loads() is None

        a = FakeReplica(PrefixIndexPublisher(settings, "m", "replica-a"))
        a.start()
        a.store("h1", "h2")  # published into the void: Redis is not there yet
        await asyncio.sleep(0.3)
        server = LocalRedis.start(port=port)
        try:
            relaxed = PrefixIndexLookup(_settings(settings.url), "m")
            await _until(lambda: _equals(relaxed, ["replica-a"], ["h1", "h2"],
                                         {"replica-a": (2, 0)}))
        finally:
            await a.publisher.stop()
            server.stop()

    asyncio.run(scenario())
