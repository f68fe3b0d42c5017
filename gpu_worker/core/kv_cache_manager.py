"""KV cache manager: which blocks each request uses, and prefix caching over them.

Three verbs for the scheduler, as vLLM v1's ``get_computed_blocks / allocate_slots / free``:
``match_prefix`` finds cached full blocks, ``allocate`` reserves blocks for the tokens to
compute (``None`` means "preempt someone"), ``free`` gives a request's blocks back. After the
runner computed tokens, ``commit_computed`` makes the newly full blocks hash-addressable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gpu_worker.core.block_pool import BlockPool, KVBlock
from gpu_worker.core.request import Request
from llmserve.hashing import BlockHash
from llmserve.kv_events import KVEvent


@dataclass(frozen=True)
class PrefixCacheStats:
    """Cumulative prefix-cache counters, in tokens, counted once per admission."""

    queries: int = 0  # tokens of admitted requests looked up
    hits: int = 0  # of which served from the cache


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Per-request block tables over one :class:`BlockPool`.

    Invariant: a request's table covers at least its computed and scheduled tokens; its first
    ``_num_committed[id]`` blocks have been offered to the hash map (``commit_computed``).
    ``_blocks`` and ``_num_committed`` have the same keys: the requests that hold a table.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool = True, record_events: bool = True
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching, record_events)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._num_committed: dict[str, int] = {}
        self._queries = 0
        self._hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_requests(self) -> int:
        """Requests currently holding a block table."""
        return len(self._blocks)

    @property
    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._queries, self._hits)

    @property
    def tables(self) -> Mapping[str, Sequence[KVBlock]]:
        """Each request's block table, by request id (read-only). The scheduler's decode loop
        reads it to see, without a call per request, that a decode needs no new block (the
        test that opens ``allocate``)."""
        return self._blocks

    @property
    def num_committed(self) -> Mapping[str, int]:
        """Per request id, how many of its first blocks were offered to the hash map (read-only).
        The scheduler's ``update`` loop reads it to see, without a call per request, that no
        block became full (the test that opens ``commit_computed``)."""
        return self._num_committed

    def match_prefix(self, request: Request) -> tuple[list[int], int]:
        """Longest chain of cached full blocks of the request's tokens: (block ids, tokens).

        Never the whole sequence: at least the last token stays uncomputed so there is a
        logit to sample from. Pure lookup; nothing is reserved until ``allocate``.
        """
        if not self.enable_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        ids: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            ids.append(block.block_id)
        return ids, len(ids) * self.block_size

    def allocate(
        self, request: Request, num_new_tokens: int, cached_block_ids: Sequence[int] = ()
    ) -> list[int] | None:
        """Reserve blocks so that the request can compute ``num_new_tokens`` more tokens.

        ``cached_block_ids`` (from ``match_prefix``, only on a request's first allocation) are
        the prefix hit; the new tokens follow them. Returns the ids of the blocks appended to
        the request's table, or ``None`` (nothing changed) when too few blocks are free.
        """
        table = self._blocks.get(request.request_id)
        if table is not None and not cached_block_ids and (
            _cdiv(request.num_computed_tokens + request.num_inflight_tokens + num_new_tokens, self.block_size)
            <= len(table)
        ):
            return []  # the common decode step: the request's last block has room (no change)
        cached = [self.pool.blocks[i] for i in cached_block_ids]
        if cached:
            self._check_prefix_hit(request, table, cached)
        num_held = len(table) if table else 0
        # Tokens of a step still in flight (async scheduling) already hold their slots.
        num_computed = request.num_scheduled_tokens + len(cached) * self.block_size
        num_needed = _cdiv(num_computed + num_new_tokens, self.block_size) - num_held - len(cached)
        # Touching a free cached block takes it off the free list too.
        num_free_after_touch = self.pool.num_free_blocks - sum(1 for b in cached if b.ref_cnt == 0)
        if num_needed > num_free_after_touch:
            return None
        if table is None:
            table = self._blocks[request.request_id] = []
            self._num_committed[request.request_id] = len(cached)
            self._queries += request.num_tokens if self.enable_caching else 0
            self._hits += len(cached) * self.block_size
        self.pool.touch(cached)
        table.extend(cached)
        new_blocks = self.pool.get_new_blocks(max(num_needed, 0))
        table.extend(new_blocks)
        return [b.block_id for b in new_blocks]

    def _check_prefix_hit(self, request: Request, table: list[KVBlock] | None, cached: list[KVBlock]) -> None:
        if table or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id}: a prefix hit is only valid on first allocation")
        for block, block_hash in zip(cached, request.block_hashes, strict=False):
            if block.block_hash != block_hash:
                raise ValueError(f"request {request.request_id}: stale prefix match (block {block.block_id})")

    def commit_computed(self, request: Request) -> None:
        """Cache the blocks that became full with the request's computed tokens."""
        table = self._blocks.get(request.request_id)
        if table is None:
            return
        done = self._num_committed[request.request_id]
        num_full = request.num_computed_tokens // self.block_size
        if num_full <= done:  # the common decode step: no block became full
            return
        num_full = min(num_full, len(table), len(request.block_hashes))
        if num_full <= done:
            return
        self.pool.cache_full_blocks(table[done:num_full], request.block_hashes[done:num_full])
        self._num_committed[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Give back all of the request's blocks (no-op if it holds none).

        Blocks are freed last-first, so a request's tail blocks (least likely to be shared)
        are the first eviction candidates, as in vLLM.
        """
        table = self._blocks.pop(request.request_id, None)
        self._num_committed.pop(request.request_id, None)
        if table:
            self.pool.free_blocks(reversed(table))

    def block_ids(self, request: Request) -> list[int]:
        """The request's block table (empty when it holds no blocks)."""
        return [b.block_id for b in self._blocks.get(request.request_id, ())]

    def cached_block_hashes(self) -> set[BlockHash]:
        return self.pool.cached_block_hashes()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only while no request holds blocks. Returns success."""
        return self.pool.reset_prefix_cache()

    def take_events(self) -> list[KVEvent]:
        return self.pool.take_events()
