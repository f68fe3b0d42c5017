"""WorkerPublisher against real stores: registration, KV events, resync, outages, drain."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmserve.fleet import (
    LoadReport,
    MemoryStateStore,
    PublisherTiming,
    StateStore,
    WorkerIdentity,
    WorkerPublisher,
)
from llmserve.fleet.redis_store import RedisStateStore
from llmserve.hashing import block_hashes
from llmserve.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

FAST = PublisherTiming(heartbeat_interval_s=0.1, ttl_s=1.0, kv_flush_interval_s=0.02)


@dataclass
class FakeEngine:
    """What the publisher's callables read: a cached-hash set and a queue of the engine's KV events."""

    cached: set[bytes] = field(default_factory=set)
    events: list[Any] = field(default_factory=list)
    running: int = 0

    def store(self, hashes: list[bytes]) -> None:
        self.cached.update(hashes)
        self.events.append(BlockStored(tuple(hashes)))

    def evict(self, hashes: list[bytes]) -> None:
        self.cached.difference_update(hashes)
        self.events.append(BlockRemoved(tuple(hashes)))

    def take_events(self) -> list[Any]:
        out, self.events = self.events, []
        return out

    async def cached_block_hashes(self) -> set[bytes]:
        await asyncio.sleep(0)  # answered later, as the engine answers between two steps
        return set(self.cached)


def make_publisher(store: StateStore, engine: FakeEngine, wid: str = "w1") -> WorkerPublisher:
    return WorkerPublisher(
        store,
        WorkerIdentity(wid, "m", "127.0.0.1:1", 16, 2048),
        load_fn=lambda: LoadReport(num_running=engine.running, max_num_seqs=8, max_queue_len=64),
        kv_events_fn=engine.take_events,
        cached_hashes_fn=engine.cached_block_hashes,
        timing=FAST,
    )


async def wait_for(cond: Callable[[], Any], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


CHAIN = block_hashes(list(range(160)), 16, seed="m")


async def test_publishes_record_load_and_kv_events(store: StateStore) -> None:
    engine = FakeEngine(running=2)
    engine.store(CHAIN[:4])
    pub = make_publisher(store, engine)
    await pub.start()
    view = await store.read_fleet()
    assert [(w.worker_id, w.load.num_running) for w in view.workers] == [("w1", 2)]
    assert await store.match_prefixes({"w1": CHAIN}) == {"w1": 4}
    engine.store(CHAIN[4:8])
    engine.evict(CHAIN[:1])
    engine.running = 5

    async def updated() -> bool:
        m = await store.match_prefixes({"w1": CHAIN[1:]})
        view = await store.read_fleet()
        return m == {"w1": 7} and view.workers[0].load.num_running == 5

    await wait_for(updated)
    assert await store.match_prefixes({"w1": CHAIN}) == {"w1": 0}  # block 0 evicted breaks the chain
    await pub.drain()
    assert (await store.read_fleet()).workers[0].draining
    await pub.deregister()
    assert (await store.read_fleet()).workers == ()


async def test_all_blocks_cleared_resyncs_from_snapshot() -> None:
    store = MemoryStateStore()
    engine = FakeEngine()
    engine.store(CHAIN[:5])
    pub = make_publisher(store, engine)
    await pub.publish_once()
    engine.cached = set(CHAIN[:2])  # cache dropped then two blocks stored again
    engine.events.append(AllBlocksCleared())
    assert await pub.publish_once()
    assert await store.match_prefixes({"w1": CHAIN}) == {"w1": 2}


async def test_survives_redis_restart_and_resyncs(redis_server: Any) -> None:
    store = RedisStateStore(redis_server.url)
    engine = FakeEngine()
    engine.store(CHAIN[:6])
    pub = make_publisher(store, engine)
    await pub.start()
    try:
        assert await store.match_prefixes({"w1": CHAIN}) == {"w1": 6}
        redis_server.stop()
        engine.store(CHAIN[6:8])  # happens while Redis is down: drained and lost, resync recovers it
        await asyncio.sleep(0.3)  # several failing ticks; the publisher must keep running
        assert pub._task is not None and not pub._task.done()
        redis_server.start()  # empty Redis on the same port

        async def back() -> bool:
            try:
                view = await store.read_fleet()
                m = await store.match_prefixes({"w1": CHAIN})
            except Exception:
                return False
            return [w.worker_id for w in view.workers] == ["w1"] and m == {"w1": 8}

        await wait_for(back)
    finally:
        await pub.stop()
        await store.close()


async def test_marker_loss_triggers_full_resync(redis_server: Any) -> None:
    store = RedisStateStore(redis_server.url)
    engine = FakeEngine()
    engine.store(CHAIN[:3])
    pub = make_publisher(store, engine)
    await pub.publish_once()
    await store.remove_worker("w1")  # KV set and marker gone, as after a flush
    await asyncio.sleep(FAST.heartbeat_interval_s)
    await pub.publish_once()
    assert await store.match_prefixes({"w1": CHAIN}) == {"w1": 3}
    await store.close()


async def test_stop_returns_even_when_redis_swallows_the_cancellation(redis_server: Any) -> None:
    """redis-py can swallow a cancellation that lands inside one of its calls; stop() (and with it
    a worker's drain) must still end. Cancels are made to land at random points of the ticks."""
    store = RedisStateStore(redis_server.url)
    engine = FakeEngine()
    engine.store(CHAIN[:4])
    pub = make_publisher(store, engine)
    rng = random.Random(0)
    for _ in range(40):
        await pub.start()
        await asyncio.sleep(rng.uniform(0.0, 0.05))
        await asyncio.wait_for(pub.stop(), timeout=30)  # a hang guard, not a timing check
    await pub.start()  # still publishes after being stopped and started again
    engine.store(CHAIN[4:6])
    assert await pub.publish_once()
    await pub.deregister()
    await store.close()
