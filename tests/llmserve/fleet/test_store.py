"""Both StateStore implementations behave the same: records with TTL, KV sets, prefix matches."""

from __future__ import annotations

import asyncio
import time

from llmserve.fleet import KVDelta, LoadReport, MemoryStateStore, StateStore, WorkerRecord
from llmserve.hashing import block_hashes


def record(wid: str, model: str = "m", **load: int) -> WorkerRecord:
    return WorkerRecord(wid, model, f"127.0.0.1:{1000 + len(wid)}", 16, 2048, LoadReport(**load),
                        heartbeat_at=time.time())


async def test_record_roundtrip_and_models(store: StateStore) -> None:
    w1 = record("w1", "a", num_running=3)
    assert await store.heartbeat(w1, ttl_s=5) is False  # no KV marker yet
    await store.heartbeat(record("w2", "b"), ttl_s=5)
    view = await store.read_fleet()
    assert [w.worker_id for w in view.workers] == ["w1", "w2"]
    assert view.workers[0].load.num_running == 3
    assert view.workers[0] == w1
    assert view.models == {"a", "b"}
    assert view.epoch


async def test_record_expires_after_ttl_but_model_is_remembered(store: StateStore) -> None:
    await store.heartbeat(record("w1", "a"), ttl_s=0.3)
    await store.heartbeat(record("w2", "a"), ttl_s=30)
    for _ in range(100):
        view = await store.read_fleet()
        if [w.worker_id for w in view.workers] == ["w2"]:
            break
        await asyncio.sleep(0.05)
    assert [w.worker_id for w in view.workers] == ["w2"]
    assert view.models == {"a"}


async def test_kv_deltas_in_order_and_prefix_match(store: StateStore) -> None:
    chain = block_hashes(list(range(64)), 16, seed="m")  # 4 blocks
    await store.heartbeat(record("w1"), ttl_s=5)
    await store.heartbeat(record("w2"), ttl_s=5)
    await store.replace_kv("w1", chain[:3], ttl_s=5)
    assert await store.heartbeat(record("w1"), ttl_s=5) is True  # marker now present
    # w2: stored then removed in one batch -> only chain[0] remains; chain[2] alone does not count.
    await store.apply_kv("w2", [KVDelta(stored=(chain[0], chain[1])), KVDelta(removed=(chain[1],)),
                                KVDelta(stored=(chain[2],))], ttl_s=5)
    got = await store.match_prefixes({"w1": chain, "w2": chain, "w3": chain, "w4": []})
    assert got == {"w1": 3, "w2": 1, "w3": 0, "w4": 0}


async def test_replace_kv_drops_old_hashes(store: StateStore) -> None:
    chain = block_hashes(list(range(48)), 16, seed="m")
    await store.apply_kv("w1", [KVDelta(stored=tuple(chain))], ttl_s=5)
    await store.replace_kv("w1", [chain[0]], ttl_s=5)
    assert await store.match_prefixes({"w1": chain}) == {"w1": 1}


async def test_remove_worker(store: StateStore) -> None:
    chain = block_hashes(list(range(32)), 16, seed="m")
    await store.heartbeat(record("w1"), ttl_s=5)
    await store.replace_kv("w1", chain, ttl_s=5)
    await store.remove_worker("w1")
    assert (await store.read_fleet()).workers == ()
    assert await store.match_prefixes({"w1": chain}) == {"w1": 0}
    assert await store.heartbeat(record("w1"), ttl_s=5) is False  # marker gone: resync needed


async def test_documents_roundtrip_replace_delete_and_expire(store: StateStore) -> None:
    assert await store.get_document("response", "r1") is None
    await store.put_document("response", "r1", b"one", ttl_s=30)
    await store.put_document("other", "r1", b"kind apart", ttl_s=30)
    assert await store.get_document("response", "r1") == b"one"
    await store.put_document("response", "r1", b"\x00two", ttl_s=30)
    assert await store.get_document("response", "r1") == b"\x00two"
    assert await store.delete_document("response", "r1") is True
    assert await store.delete_document("response", "r1") is False
    assert await store.get_document("response", "r1") is None
    assert await store.get_document("other", "r1") == b"kind apart"
    await store.put_document("response", "short", b"x", ttl_s=0.2)
    for _ in range(100):
        if await store.get_document("response", "short") is None:
            break
        await asyncio.sleep(0.05)
    assert await store.get_document("response", "short") is None


async def test_the_memory_store_drops_its_oldest_documents_past_its_room() -> None:
    store = MemoryStateStore(max_document_bytes=10)
    await store.put_document("d", "a", b"1234", ttl_s=30)
    await store.put_document("d", "b", b"1234", ttl_s=30)
    await store.put_document("d", "a", b"12", ttl_s=30)  # replaced: now the newest
    await store.put_document("d", "c", b"1234", ttl_s=30)  # 4 + 2 + 4 = 10: all fit
    await store.put_document("d", "e", b"123", ttl_s=30)  # b goes first, the oldest
    assert [await store.get_document("d", k) for k in "abce"] == [b"12", None, b"1234", b"123"]
    await store.put_document("d", "huge", b"x" * 11, ttl_s=30)  # never fits, evicts nothing
    assert await store.get_document("d", "huge") is None and await store.get_document("d", "a") == b"12"
