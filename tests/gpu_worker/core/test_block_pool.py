"""BlockPool: exact block ids, reference counts, LRU eviction order and events."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gpu_worker.core
from gpu_worker.core.block_pool import BlockPool, FreeBlockQueue, KVBlock
from llmserve.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

H = [bytes([i]) * 16 for i in range(10)]  # stand-in block hashes


def assert_pool_empty(pool: BlockPool) -> None:
    assert [b.ref_cnt for b in pool.blocks] == [0] * pool.num_blocks
    assert sorted(pool.free_block_ids()) == list(range(pool.num_blocks))


def test_new_blocks_come_from_the_head_in_id_order() -> None:
    pool = BlockPool(6)
    assert pool.free_block_ids() == [0, 1, 2, 3, 4, 5]
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 3
    assert pool.usage == 0.5
    assert pool.free_block_ids() == [3, 4, 5]
    pool.free_blocks(reversed(blocks))
    # Freed in reverse: the request's last block is the first eviction candidate.
    assert pool.free_block_ids() == [3, 4, 5, 2, 1, 0]
    assert_pool_empty(pool)


def test_too_many_blocks_raise_without_side_effects() -> None:
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="only 2 free"):
        pool.get_new_blocks(3)
    assert pool.free_block_ids() == [0, 1]
    assert_pool_empty(pool)


def test_cached_blocks_are_hit_until_evicted_in_lru_order() -> None:
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, H[:2])
    assert pool.take_events() == [BlockStored((H[0], H[1]))]
    assert pool.take_events() == []
    pool.free_blocks(reversed(blocks))
    assert pool.free_block_ids() == [2, 3, 1, 0]
    # Free cached blocks keep their hash and can be hit.
    assert pool.get_cached_block(H[0]) is pool.blocks[0]
    assert pool.cached_block_hashes() == {H[0], H[1]}
    # A hit takes the block out of the free list.
    pool.touch([pool.blocks[0]])
    assert pool.blocks[0].ref_cnt == 1
    assert pool.free_block_ids() == [2, 3, 1]
    # New blocks: 2 and 3 are uncached, then block 1 (cached) is evicted.
    got = pool.get_new_blocks(3)
    assert [b.block_id for b in got] == [2, 3, 1]
    assert pool.take_events() == [BlockRemoved((H[1],))]
    assert pool.get_cached_block(H[1]) is None
    assert got[2].block_hash is None
    assert pool.cached_block_hashes() == {H[0]}
    pool.free_blocks(reversed(got))
    pool.free_blocks([pool.blocks[0]])
    assert pool.free_block_ids() == [1, 3, 2, 0]
    assert_pool_empty(pool)


def test_touch_shared_block_counts_references() -> None:
    pool = BlockPool(3)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([block], [H[5]])
    pool.touch([block])
    pool.touch([block])
    assert block.ref_cnt == 3
    pool.free_blocks([block])
    pool.free_blocks([block])
    assert block.ref_cnt == 1
    assert pool.free_block_ids() == [1, 2]
    pool.free_blocks([block])
    assert pool.free_block_ids() == [1, 2, 0]
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([block])
    assert_pool_empty(pool)


def test_same_hash_computed_twice_keeps_the_first_block() -> None:
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    pool.cache_full_blocks([a], [H[3]])
    pool.cache_full_blocks([b], [H[3]])
    assert pool.get_cached_block(H[3]) is a
    assert b.block_hash is None
    assert pool.take_events() == [BlockStored((H[3],))]
    # Already-hashed blocks (prefix hits) are skipped, with no second event.
    pool.cache_full_blocks([a], [H[3]])
    assert pool.take_events() == []
    pool.free_blocks([b, a])
    assert pool.free_block_ids() == [2, 3, 1, 0]
    assert_pool_empty(pool)


def test_reset_prefix_cache_only_when_idle() -> None:
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, H[:2])
    pool.take_events()
    assert pool.reset_prefix_cache() is False
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache() is True
    assert pool.take_events() == [AllBlocksCleared()]
    assert pool.cached_block_hashes() == set()
    assert [b.block_hash for b in pool.blocks] == [None, None, None]
    assert_pool_empty(pool)


def test_caching_disabled_stores_nothing() -> None:
    pool = BlockPool(2, enable_caching=False)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, H[:2])
    assert pool.get_cached_block(H[0]) is None
    assert pool.take_events() == []
    pool.free_blocks(blocks)
    assert_pool_empty(pool)


def test_free_queue_removes_anywhere_in_constant_time() -> None:
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    queue.remove(blocks[0])
    queue.remove(blocks[4])
    assert [b.block_id for b in queue] == [1, 3]
    assert len(queue) == 2
    with pytest.raises(ValueError, match="not in the free list"):
        queue.remove(blocks[2])
    queue.append(blocks[2])
    assert queue.popleft() is blocks[1]
    assert [b.block_id for b in queue] == [3, 2]
    assert queue.popleft() is blocks[3]
    assert queue.popleft() is blocks[2]
    with pytest.raises(ValueError, match="no free blocks"):
        queue.popleft()


def test_engine_core_modules_never_import_torch() -> None:
    core_dir = Path(gpu_worker.core.__file__).parent
    imported: set[str] = set()
    for path in sorted(core_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert imported - {
        "__future__",
        "abc",
        "bisect",
        "collections",
        "dataclasses",
        "enum",
        "itertools",
        "logging",
        "types",
        "typing",
    } == {
        "gpu_worker",
        "llmserve",
    }
