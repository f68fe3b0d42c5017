"""Writing new K/V rows into their paged cache slots (fp8 caches: quantized with their scales)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_ops.attention_common import kv_scale_args
from kernels.triton_ops.fp8_common import quantize_e4m3, software_fp8


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
    k_scale_ptr,
    v_scale_ptr,
    stride_kv_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    KV_FP8: tl.constexpr,
    SOFT_FP8: tl.constexpr,
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
    if KV_FP8:
        k_inv, v_inv = _inverse_scales(k_scale_ptr, v_scale_ptr, heads, num_kv_heads, stride_kv_scale)
        tl.store(key_cache_ptr + dst, quantize_e4m3(k.to(tl.float32), k_inv[:, None], SOFT_FP8), mask=mask)
        tl.store(value_cache_ptr + dst, quantize_e4m3(v.to(tl.float32), v_inv[:, None], SOFT_FP8), mask=mask)
    else:
        tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _inverse_scales(k_scale_ptr, v_scale_ptr, heads, num_kv_heads, stride_kv_scale):
    """``1 / k_scale`` and ``1 / v_scale`` of each head in ``heads`` (each rounded once)."""
    ok = heads < num_kv_heads
    ks = tl.load(k_scale_ptr + heads * stride_kv_scale, mask=ok, other=1.0)
    vs = tl.load(v_scale_ptr + heads * stride_kv_scale, mask=ok, other=1.0)
    one = tl.full(ks.shape, 1.0, tl.float32)
    return tl.div_rn(one, ks), tl.div_rn(one, vs)


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Triton :func:`kernels.reference.store_kvcache` (negative slots are skipped; fp8 caches
    need ``k_scale``/``v_scale``)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("store_kvcache: the KV caches must be contiguous")
    if head_dim & (head_dim - 1):
        raise ValueError(f"store_kvcache: head_dim must be a power of two, got {head_dim}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    fp8 = kv_scale_args(key_cache, k_scale, v_scale, num_kv_heads, slot_mapping)
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
        fp8.k_scale,
        fp8.v_scale,
        fp8.stride,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        KV_FP8=fp8.fp8,
        SOFT_FP8=software_fp8(key_cache),
        num_warps=4,
    )
