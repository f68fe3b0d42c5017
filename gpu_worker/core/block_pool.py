"""Physical KV blocks: reference counts, an O(1) LRU free list and the hash -> block map.

A block is in exactly one of two states: *in use* (``ref_cnt > 0``, in no list) or *free*
(``ref_cnt == 0``, in the free list). A free block may still carry a hash: it is then a cached
block that a later prompt can hit (``touch``) until ``get_new_blocks`` evicts it from the head
of the free list.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from llmserve.hashing import BlockHash
from llmserve.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


class KVBlock:
    """One physical block of the KV cache (``block_size`` token slots in every layer)."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None  # set only while the block is in the hash map
        # Links of the free list; both None exactly when the block is not in the list.
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        cached = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={cached})"


class FreeBlockQueue:
    """Doubly linked list of free blocks in eviction order (head = evicted first).

    All operations are O(1); blocks carry their own links, so there is no per-node allocation.
    """

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)  # sentinels: real blocks always sit between them
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def append(self, block: KVBlock) -> None:
        """Put ``block`` at the tail (evicted last)."""
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._len += 1

    def remove(self, block: KVBlock) -> None:
        """Unlink ``block`` from anywhere in the list."""
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free list")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def popleft(self) -> KVBlock:
        """Remove and return the head (the least recently freed block)."""
        first = self._head.next_free
        if first is None or first is self._tail:
            raise ValueError("no free blocks")
        self.remove(first)
        return first

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not None and node is not self._tail:
            yield node
            node = node.next_free


class BlockPool:
    """All KV blocks of one worker, ids ``0 .. num_blocks - 1``.

    With ``record_events`` it records :mod:`llmserve.kv_events` when blocks enter
    (``cache_full_blocks``) or leave (eviction, ``reset_prefix_cache``) the hash map;
    ``take_events()`` drains them. Whoever turns recording on must drain them.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True, record_events: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self.blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        self._events: list[KVEvent] = []
        self._record_events = record_events

    @property
    def num_free_blocks(self) -> int:
        """Blocks not used by any request (cached free blocks included: they can be evicted)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by requests (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """Free block ids in eviction order (for tests and debugging; O(n))."""
        return [b.block_id for b in self._free]

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Take ``num_blocks`` blocks from the head of the free list, evicting their hashes."""
        if num_blocks > len(self._free):
            raise ValueError(f"cannot get {num_blocks} blocks: only {len(self._free)} free")
        out: list[KVBlock] = []
        evicted: list[BlockHash] = []
        for _ in range(num_blocks):
            block = self._free.popleft()
            if block.block_hash is not None:
                evicted.append(block.block_hash)
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        if evicted and self._record_events:
            self._events.append(BlockRemoved(tuple(evicted)))
        return out

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        """The block holding ``block_hash``, in use or free, if still cached."""
        return self._cached.get(block_hash)

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks hit in the prefix cache (free ones leave the free list)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._free.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVBlock]) -> None:
        """Drop one reference per block; blocks reaching 0 join the free list tail in the given
        order (so the first block given is evicted first among them)."""
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than allocated")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free.append(block)

    def cache_full_blocks(self, blocks: Sequence[KVBlock], block_hashes: Sequence[BlockHash]) -> None:
        """Make full, computed blocks hash-addressable; ``blocks[i]`` holds ``block_hashes[i]``.

        Blocks that already carry a hash (prefix hits) are skipped. When another block already
        holds the same hash (two requests computed the same content at once), the first keeps
        the map entry and this block stays unhashed: it is freed as a plain block.
        """
        if not self.enable_caching:
            return
        stored: list[BlockHash] = []
        for block, block_hash in zip(blocks, block_hashes, strict=True):
            if block.block_hash is not None or block_hash in self._cached:
                continue
            block.block_hash = block_hash
            self._cached[block_hash] = block
            stored.append(block_hash)
        if stored and self._record_events:
            self._events.append(BlockStored(tuple(stored)))

    def cached_block_hashes(self) -> set[BlockHash]:
        """A snapshot of every hash currently cached (for full resyncs of the router index)."""
        return set(self._cached)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible while no block is in use. Returns success."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        if self._record_events:
            self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        """Drain the events recorded since the last call, oldest first."""
        events, self._events = self._events, []
        return events
