"""Writing new K/V rows into their paged cache slots."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HEAD_DIM)
    # A negative slot is a padding token: nothing is read or written for it.
    keep = tl.full([BLOCK_H, HEAD_DIM], 0, tl.int64) + slot >= 0
    mask = (heads < num_kv_heads)[:, None] & keep
    src_k = key_ptr + t * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    src_v = value_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    # The caches are contiguous: a slot is num_kv_heads * HEAD_DIM consecutive elements.
    dst = slot * num_kv_heads * HEAD_DIM + heads[:, None] * HEAD_DIM + dims[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton :func:`kernels.reference.store_kvcache` (negative slots are skipped)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("store_kvcache: the KV caches must be contiguous")
    if head_dim & (head_dim - 1):
        raise ValueError(f"store_kvcache: head_dim must be a power of two, got {head_dim}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        num_warps=4,
    )
