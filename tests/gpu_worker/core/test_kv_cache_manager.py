"""KVCacheManager: prefix hits, partial blocks, allocation failure, events, free order."""

from __future__ import annotations

from gpu_worker.core.kv_cache_manager import KVCacheManager, PrefixCacheStats
from gpu_worker.core.request import Request
from gpu_worker.sampling_params import SamplingParams
from llmserve.hashing import block_hashes
from llmserve.kv_events import BlockRemoved, BlockStored
from tests.gpu_worker.core.core_fakes import assert_no_leak

BS = 4
SEED = "test-model"


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), block_size=BS, hash_seed=SEED)


def compute(
    kv: KVCacheManager, request: Request, n: int, cached: list[int] | tuple[int, ...] = ()
) -> list[int]:
    """Allocate and pretend the runner computed ``n`` tokens (as the scheduler would)."""
    new = kv.allocate(request, n, cached)
    assert new is not None
    request.num_computed_tokens += len(cached) * BS + n
    kv.commit_computed(request)
    return new


def test_request_hash_chain_extends_with_output_tokens() -> None:
    r = req("a", list(range(7)))
    assert r.block_hashes == block_hashes(list(range(7)), BS, SEED)
    assert len(r.block_hashes) == 1
    r.append_output_token(7)
    assert r.all_token_ids == list(range(8))
    assert r.output_token_ids == [7]
    assert r.block_hashes == block_hashes(list(range(8)), BS, SEED)
    assert len(r.block_hashes) == 2


def test_prefix_hit_shares_full_blocks_only() -> None:
    kv = KVCacheManager(10, BS)
    a = req("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert kv.match_prefix(a) == ([], 0)
    assert compute(kv, a, 10) == [0, 1, 2]
    # Only full computed blocks are cached; the partial block 2 is not.
    assert kv.take_events() == [BlockStored(tuple(a.block_hashes[:2]))]
    assert kv.cached_block_hashes() == set(a.block_hashes[:2])
    assert kv.pool.blocks[2].block_hash is None

    b = req("b", list(range(9)) + [99, 98, 97])  # same first 2 blocks, third differs
    assert kv.match_prefix(b) == ([0, 1], 8)
    assert compute(kv, b, 4, [0, 1]) == [3]
    assert kv.block_ids(b) == [0, 1, 3]
    assert [blk.ref_cnt for blk in kv.pool.blocks[:4]] == [2, 2, 1, 1]
    assert kv.take_events() == [BlockStored((b.block_hashes[2],))]
    assert kv.stats == PrefixCacheStats(queries=22, hits=8)

    kv.free(a)
    kv.free(b)
    # b's tail first, then its shared blocks (freed by b last), a's partial block before them.
    assert kv.pool.free_block_ids() == [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]
    assert_no_leak(kv)


def test_full_prompt_hit_recomputes_the_last_block() -> None:
    kv = KVCacheManager(6, BS)
    a = req("a", list(range(8)))  # exactly two full blocks
    compute(kv, a, 8)
    kv.free(a)
    b = req("b", list(range(8)))
    # Both blocks are cached, but one token must be computed to have a logit: drop block 1.
    assert kv.match_prefix(b) == ([0], 4)
    assert compute(kv, b, 4, [0]) == [2]
    assert kv.block_ids(b) == [0, 2]
    # Block 2 holds the same content as cached block 1: the first keeps the map entry.
    assert kv.pool.get_cached_block(b.block_hashes[1]) is kv.pool.blocks[1]
    assert kv.pool.blocks[2].block_hash is None
    kv.free(b)
    assert_no_leak(kv)


def test_allocation_failure_has_no_side_effects() -> None:
    kv = KVCacheManager(4, BS)
    a = req("a", list(range(8)))
    compute(kv, a, 8)
    kv.free(a)  # blocks 0, 1 cached and free
    kv.take_events()
    c = req("c", list(range(8)) + [50, 51, 52, 53, 54, 55, 56, 57, 58])  # 17 tokens: 5 blocks
    cached, num_cached = kv.match_prefix(c)
    assert (cached, num_cached) == ([0, 1], 8)
    # 2 cached + 3 new = 5 blocks > 4 in the pool (touching the cached ones takes them too).
    assert kv.allocate(c, 9, cached) is None
    assert kv.block_ids(c) == []
    assert kv.num_requests == 0
    assert [blk.ref_cnt for blk in kv.pool.blocks] == [0, 0, 0, 0]
    assert kv.pool.free_block_ids() == [2, 3, 1, 0]
    assert kv.cached_block_hashes() == set(a.block_hashes)
    assert kv.take_events() == []
    assert kv.stats == PrefixCacheStats(queries=8, hits=0)
    # 2 cached + 2 new fits exactly.
    assert kv.allocate(c, 5, cached) == [2, 3]
    assert kv.block_ids(c) == [0, 1, 2, 3]
    assert kv.num_free_blocks == 0
    assert kv.usage == 1.0
    kv.free(c)
    assert_no_leak(kv)


def test_eviction_emits_removed_and_stops_hits() -> None:
    kv = KVCacheManager(3, BS)
    a = req("a", list(range(8)))
    compute(kv, a, 8)
    kv.free(a)
    assert kv.pool.free_block_ids() == [2, 1, 0]
    kv.take_events()
    b = req("b", [40, 41, 42, 43, 44, 45, 46, 47, 48])
    assert kv.match_prefix(b) == ([], 0)
    assert compute(kv, b, 9) == [2, 1, 0]
    # Block 1 (a's second block) is evicted before block 0 (a's first): reverse free order.
    assert kv.take_events() == [
        BlockRemoved((a.block_hashes[1], a.block_hashes[0])),
        BlockStored(tuple(b.block_hashes)),
    ]
    assert kv.match_prefix(req("a2", list(range(8)))) == ([], 0)
    kv.free(b)
    assert_no_leak(kv)


def test_incremental_allocation_and_commit_of_decoded_tokens() -> None:
    kv = KVCacheManager(4, BS)
    a = req("a", [1, 2, 3])
    assert compute(kv, a, 3) == [0]
    assert kv.take_events() == []
    a.append_output_token(4)  # the block becomes full once token 4 is computed
    assert compute(kv, a, 1) == []
    assert kv.take_events() == [BlockStored((a.block_hashes[0],))]
    a.append_output_token(5)
    assert compute(kv, a, 1) == [1]
    assert kv.block_ids(a) == [0, 1]
    # After a preemption the request hits its own cached block, output tokens included.
    kv.free(a)
    a.num_computed_tokens = 0
    assert kv.match_prefix(a) == ([0], 4)
    kv.free(a)  # freeing a request without blocks is a no-op
    assert_no_leak(kv)


def test_tables_and_committed_counts_follow_allocate_commit_and_free() -> None:
    """The read-only views the scheduler's loops test instead of calling ``allocate`` and
    ``commit_computed``: a key per request holding a table, in both."""
    kv = KVCacheManager(8, BS)
    b = req("b", list(range(8)))
    compute(kv, b, 8)
    kv.free(b)
    a = req("a", list(range(6)))
    assert dict(kv.tables) == {} and dict(kv.num_committed) == {}
    assert compute(kv, a, 2, [0]) == [2]  # a prefix hit counts as committed
    assert [blk.block_id for blk in kv.tables["a"]] == kv.block_ids(a) == [0, 2]
    assert dict(kv.num_committed) == {"a": 1}
    a.append_output_token(6)
    a.append_output_token(7)
    assert compute(kv, a, 2) == []  # room in the table: the test the scheduler inlines
    assert dict(kv.num_committed) == {"a": 2}  # block 2 became full
    a.append_output_token(8)
    assert compute(kv, a, 1) == [3]
    assert [blk.block_id for blk in kv.tables["a"]] == [0, 2, 3]
    assert dict(kv.num_committed) == {"a": 2}
    kv.free(a)
    assert dict(kv.tables) == {} and dict(kv.num_committed) == {}


def test_caching_disabled_never_hits() -> None:
    kv = KVCacheManager(4, BS, enable_caching=False)
    a = req("a", list(range(8)))
    compute(kv, a, 8)
    kv.free(a)
    assert kv.match_prefix(req("b", list(range(8)))) == ([], 0)
    assert kv.take_events() == []
    assert kv.cached_block_hashes() == set()
    assert kv.stats == PrefixCacheStats(0, 0)
    assert_no_leak(kv)
