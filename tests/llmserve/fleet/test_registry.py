"""Router-side Registry: 1 s cache, last known state when the store is down, epoch grace."""

from __future__ import annotations

import time
from typing import Any

from llmserve.fleet import LoadReport, MemoryStateStore, Registry, WorkerRecord
from llmserve.fleet.redis_store import RedisStateStore


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def rec(wid: str, model: str = "m", draining: bool = False) -> WorkerRecord:
    return WorkerRecord(wid, model, "127.0.0.1:1", 16, 2048, LoadReport(), draining=draining,
                        heartbeat_at=time.time())


async def test_cache_hides_changes_until_it_expires() -> None:
    store, clock = MemoryStateStore(), Clock()
    reg = Registry(store, cache_s=1.0, clock=clock)
    await store.heartbeat(rec("w1"), 60)
    assert [w.worker_id for w in (await reg.snapshot()).workers] == ["w1"]
    await store.heartbeat(rec("w2"), 60)
    assert [w.worker_id for w in (await reg.snapshot()).workers] == ["w1"]  # cached
    clock.t += 1.01
    snap = await reg.snapshot()
    assert [w.worker_id for w in snap.workers] == ["w1", "w2"]
    assert [w.worker_id for w in snap.workers_of("m")] == ["w1", "w2"]


async def test_draining_workers_are_not_candidates() -> None:
    store = MemoryStateStore()
    await store.heartbeat(rec("w1", draining=True), 60)
    await store.heartbeat(rec("w2", model="other"), 60)
    snap = await Registry(store).snapshot()
    assert snap.workers_of("m") == []
    assert snap.models == {"m", "other"}
    assert set(snap.live_models()) == {"other"}


async def test_keeps_last_known_registry_while_redis_is_down(redis_server: Any) -> None:
    store, clock = RedisStateStore(redis_server.url), Clock()
    reg = Registry(store, cache_s=1.0, grace_s=5.0, clock=clock)
    await store.heartbeat(rec("w1"), 60)
    assert not (await reg.snapshot()).stale
    redis_server.stop()
    clock.t += 2
    snap = await reg.snapshot()
    assert snap.stale and [w.worker_id for w in snap.workers] == ["w1"]
    assert await reg.longest_prefixes({"w1": [b"x" * 16]}) == {"w1": 0}  # degrades, never raises
    redis_server.start()  # empty: new epoch, nobody registered yet
    clock.t += 2
    snap = await reg.snapshot()
    assert [w.worker_id for w in snap.workers] == ["w1"], "known workers are kept while they re-register"
    assert snap.models == {"m"}
    await store.heartbeat(rec("w2"), 60)  # w2 registers, w1 never comes back
    clock.t += 2
    assert [w.worker_id for w in (await reg.snapshot()).workers] == ["w1", "w2"]
    clock.t += 6  # grace over
    snap = await reg.snapshot()
    assert [w.worker_id for w in snap.workers] == ["w2"] and not snap.stale
    await store.close()


async def test_a_burst_on_a_cold_registry_waits_for_the_read(redis_server: Any) -> None:
    """A router whose last read found no worker (it started first) must not answer the requests
    that arrive during the next read from that empty snapshot (issue 17: NOT_FOUND under load)."""
    import asyncio

    import redis.asyncio as aioredis

    store, clock = RedisStateStore(redis_server.url), Clock()
    reg = Registry(store, cache_s=1.0, clock=clock)
    assert (await reg.snapshot()).workers == ()  # started before any worker
    await store.heartbeat(rec("w1"), 60)
    clock.t += 2  # the cache has expired: the first call of the burst reads, the others arrive meanwhile
    admin = aioredis.from_url(redis_server.url)
    try:
        await admin.execute_command("CLIENT", "PAUSE", "300", "ALL")  # every read now takes 0.3 s
        snaps = await asyncio.gather(*(reg.snapshot() for _ in range(20)))
    finally:
        await admin.aclose()
        await store.close()
    assert all([w.worker_id for w in s.workers] == ["w1"] for s in snaps)


async def test_a_caller_cancelled_during_a_read_leaves_the_read_to_finish(redis_server: Any) -> None:
    """A request cancelled while it refreshes the registry (its client went away) must not cancel
    the Redis read under it: redis-py can hang a task cancelled inside a pipeline read, and this
    one holds the registry's lock. The read finishes on its own and its snapshot is kept."""
    import asyncio

    import redis.asyncio as aioredis

    store, clock = RedisStateStore(redis_server.url), Clock()
    reg = Registry(store, cache_s=1.0, clock=clock)
    assert (await reg.snapshot()).workers == ()
    await store.heartbeat(rec("w1"), 60)
    clock.t += 2
    admin = aioredis.from_url(redis_server.url)
    try:
        await admin.execute_command("CLIENT", "PAUSE", "400", "ALL")  # the next read takes 0.4 s
        caller = asyncio.create_task(reg.snapshot())
        await asyncio.sleep(0.1)  # inside the read
        caller.cancel()
        try:
            await caller
        except asyncio.CancelledError:
            pass
        assert caller.cancelled()
        # No new read is due (the clock stands still): what the next caller gets is what the
        # cancelled caller's read brought back, once it has.
        snap = await asyncio.wait_for(reg.snapshot(), timeout=5)
        for _ in range(100):
            if snap.workers:
                break
            await asyncio.sleep(0.05)
            snap = await reg.snapshot()
        assert [w.worker_id for w in snap.workers] == ["w1"]
    finally:
        await admin.aclose()
        await store.close()
