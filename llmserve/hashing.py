"""Stable block hashes for prefix caching, shared by worker and router.

A prompt is cut into full blocks of ``block_size`` tokens. Block ``i`` hashes to
``h_i = H(h_{i-1} || tokens of block i || extra keys)`` with ``h_{-1}`` derived from a
seed (the served model name), so two token sequences share ``h_i`` exactly when their
first ``(i + 1) * block_size`` tokens are equal (up to a 128-bit collision). A block that an
image's placeholder run overlaps (``llmserve.multimodal``) adds the image's hash to its extra
keys, so equal placeholder tokens of different images never share a block. The hash is
BLAKE2b, never Python's randomized ``hash()``: every process on every host must agree.
This module must stay free of torch: the router imports it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmserve.multimodal import ImageSpan

BlockHash = bytes
_DIGEST_SIZE = 16


def root_hash(seed: str) -> BlockHash:
    """The parent hash of a sequence's first block."""
    return hashlib.blake2b(seed.encode("utf-8"), digest_size=_DIGEST_SIZE, person=b"llmserve-root").digest()


def hash_block(parent: BlockHash, token_ids: Sequence[int], extra: bytes = b"") -> BlockHash:
    """Hash one full block given its parent's hash."""
    h = hashlib.blake2b(parent, digest_size=_DIGEST_SIZE, person=b"llmserve-block")
    h.update(array("q", token_ids).tobytes())
    if extra:
        h.update(extra)
    return h.digest()


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    seed: str,
    *,
    start: int = 0,
    parent: BlockHash | None = None,
    extra: bytes = b"",
    images: Sequence[ImageSpan] = (),
) -> list[BlockHash]:
    """Hashes of the full blocks of ``token_ids`` from block index ``start`` on.

    ``parent`` must be the hash of block ``start - 1`` when ``start > 0``; this lets a
    caller extend a chain incrementally as tokens are appended. ``images``: the prompt's image
    spans, in order; a block's extra keys end with the hash of each image it overlaps.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    prev = parent if start > 0 and parent is not None else root_hash(seed)
    if start > 0 and parent is None:
        raise ValueError("parent is required when start > 0")
    out: list[BlockHash] = []
    for i in range(start, len(token_ids) // block_size):
        begin, end = i * block_size, (i + 1) * block_size
        block_extra = extra
        if images:
            block_extra += b"".join(s.hash for s in images if s.offset < end and s.offset + s.length > begin)
        prev = hash_block(prev, token_ids[begin:end], block_extra)
        out.append(prev)
    return out
