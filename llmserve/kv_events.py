"""Events describing changes to the set of cached (hash-addressable) KV blocks.

The worker's block pool records them; the engine drains them with ``take_kv_events()`` and the
worker's fleet publisher turns them into deltas of the state store, where the router's prefix
index is built from them. Only hashes travel: block ids are local to one worker. Torch-free and
shared, so the engine and the fleet package use the same types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True)
class BlockStored:
    """Full, computed blocks that became hash-addressable (a later prompt can hit them)."""

    block_hashes: tuple[bytes, ...]


@dataclass(frozen=True)
class BlockRemoved:
    """Cached blocks that were evicted (their hashes can no longer be hit)."""

    block_hashes: tuple[bytes, ...]


@dataclass(frozen=True)
class AllBlocksCleared:
    """The whole prefix cache was dropped (for example after a reset)."""


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared
