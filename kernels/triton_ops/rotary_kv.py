"""Rotary embedding and the paged K/V store in one launch (one program per token).

Replaces :func:`kernels.triton_ops.rotary_embedding` followed by
:func:`kernels.triton_ops.store_kvcache`, with the same arithmetic: q goes through the rotary
kernel's own helper, k through the same float32 expression, so the results are bitwise those
of the two launches. The rotated k is written to the cache only, never back into ``k``.
fp8 caches (``KV_FP8``) get the rotated k, rounded to k's dtype, and v quantized with their
scales exactly as :func:`kernels.triton_ops.store_kvcache` quantizes them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_ops.attention_common import kv_scale_args
from kernels.triton_ops.fp8_common import quantize_e4m3, software_fp8
from kernels.triton_ops.kv_store import _inverse_scales
from kernels.triton_ops.pdl import pdl_begin, pdl_launch
from kernels.triton_ops.rotary import _cos_sin_row, _load_cos_sin, _rotate_heads, rotate_pair

# With PDL, whether the position, slot and cos/sin row are read before the PDL wait by default
# (``rotary_store_kvcache(early_inputs=None)``); timed with the decode attention's prefetch
# (``decode_attention._PREFETCH``, DECISIONS 152).
_EARLY_INPUTS = True


@triton.jit
def _rotary_store_kvcache_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    cos_sin_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos_sin,
    num_q_heads,
    num_kv_heads,
    k_scale_ptr,
    v_scale_ptr,
    stride_kv_scale,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    KV_FP8: tl.constexpr,
    SOFT_FP8: tl.constexpr,
    PDL: tl.constexpr = False,
    EARLY: tl.constexpr = False,
):
    t = tl.program_id(0).to(tl.int64)
    if EARLY:
        # Before the PDL wait: the position, its cos/sin row and the slot, which no kernel writes
        # (the host writes the first two before the step, the table is constant); read past L1
        # (``.cg``) where the host rewrites them between steps (rotary_store_kvcache's
        # ``early_inputs``; kernels/triton_ops/pdl.py).
        pos = tl.load(pos_ptr + t, cache_modifier=".cg").to(tl.int64)
        slot = tl.load(slot_ptr + t, cache_modifier=".cg").to(tl.int64)
        cos, sin = _cos_sin_row(cos_sin_ptr, stride_cos_sin, pos, HALF)
        pdl_begin(PDL)
    else:
        pdl_begin(PDL)
        cos, sin = _load_cos_sin(pos_ptr, cos_sin_ptr, stride_cos_sin, t, HALF)
        # A negative slot is a padding token: nothing of its k/v is read or written.
        slot = tl.load(slot_ptr + t).to(tl.int64)
    dims = tl.arange(0, HALF)
    # Every token's q is rotated, padding tokens included (their rows are simply unused).
    _rotate_heads(q_ptr, stride_qt, stride_qh, t, num_q_heads, cos, sin, HALF, BLOCK_HQ)

    heads = tl.arange(0, BLOCK_HK)
    keep = tl.full([BLOCK_HK, HALF], 0, tl.int64) + slot >= 0
    mask = (heads < num_kv_heads)[:, None] & keep
    src_k = k_ptr + t * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    src_v = v_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    # The caches are contiguous: a slot is num_kv_heads * 2 * HALF consecutive elements.
    dst = slot * num_kv_heads * (2 * HALF) + heads[:, None] * (2 * HALF) + dims[None, :]

    k1 = tl.load(src_k, mask=mask, other=0.0)
    k2 = tl.load(src_k + HALF, mask=mask, other=0.0)
    k1f = k1.to(tl.float32)
    k2f = k2.to(tl.float32)
    # Round to k's dtype first (what the rotary kernel writes back), then to the cache's.
    if KV_FP8:
        k_inv, v_inv = _inverse_scales(k_scale_ptr, v_scale_ptr, heads, num_kv_heads, stride_kv_scale)
        k_lo, k_hi = rotate_pair(k1f, k2f, cos, sin)
        k_lo = k_lo.to(k1.dtype).to(tl.float32)
        k_hi = k_hi.to(k1.dtype).to(tl.float32)
        tl.store(key_cache_ptr + dst, quantize_e4m3(k_lo, k_inv[:, None], SOFT_FP8), mask=mask)
        tl.store(key_cache_ptr + dst + HALF, quantize_e4m3(k_hi, k_inv[:, None], SOFT_FP8), mask=mask)
        v_lo = tl.load(src_v, mask=mask).to(tl.float32)
        v_hi = tl.load(src_v + HALF, mask=mask).to(tl.float32)
        tl.store(value_cache_ptr + dst, quantize_e4m3(v_lo, v_inv[:, None], SOFT_FP8), mask=mask)
        tl.store(value_cache_ptr + dst + HALF, quantize_e4m3(v_hi, v_inv[:, None], SOFT_FP8), mask=mask)
    else:
        cache_ty = key_cache_ptr.dtype.element_ty
        k_lo, k_hi = rotate_pair(k1f, k2f, cos, sin)
        tl.store(key_cache_ptr + dst, k_lo.to(k1.dtype).to(cache_ty), mask=mask)
        tl.store(key_cache_ptr + dst + HALF, k_hi.to(k1.dtype).to(cache_ty), mask=mask)

        value_ty = value_cache_ptr.dtype.element_ty
        tl.store(value_cache_ptr + dst, tl.load(src_v, mask=mask).to(value_ty), mask=mask)
        tl.store(value_cache_ptr + dst + HALF, tl.load(src_v + HALF, mask=mask).to(value_ty), mask=mask)


def rotary_store_kvcache(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    pdl: bool = False,
    early_inputs: bool | None = None,
) -> torch.Tensor:
    """Triton :func:`kernels.reference.rotary_store_kvcache`: rotates ``q`` in place and
    returns it; writes the rotated ``k`` and ``v`` into their cache slots (negative: skipped).
    ``pdl``: launched with programmatic dependent launch (:mod:`kernels.triton_ops.pdl`).
    ``early_inputs`` (with ``pdl``; None: ``_EARLY_INPUTS``): ``positions``, ``slot_mapping`` and
    the cos/sin rows are read before the PDL wait, so the kernel launched just before this one
    must not write ``positions`` or ``slot_mapping`` (in a decode step it is the qkv projection;
    the host writes both before the step). See :mod:`kernels.triton_ops.pdl`.

    ``q``/``k``/``v`` may be strided views (e.g. slices of a fused qkv projection) as long as
    the head dim is unit-stride; ``k`` and ``v`` are not modified. The caches must be contiguous.
    fp8 caches need ``k_scale``/``v_scale``.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim & (head_dim - 1) or head_dim < 4:
        raise ValueError(f"rotary_store_kvcache: head_dim must be a power of two >= 4, got {head_dim}")
    if q.stride(-1) != 1:
        raise ValueError("rotary_store_kvcache: q needs a unit-stride head dim to rotate in place")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("rotary_store_kvcache: the KV caches must be contiguous")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    fp8 = kv_scale_args(key_cache, k_scale, v_scale, num_kv_heads, slot_mapping)
    if num_tokens == 0:
        return q
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    _rotary_store_kvcache_kernel[(num_tokens,)](
        positions,
        q,
        k,
        v,
        cos_sin_cache,
        key_cache,
        value_cache,
        slot_mapping,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_sin_cache.stride(0),
        num_q_heads,
        num_kv_heads,
        fp8.k_scale,
        fp8.v_scale,
        fp8.stride,
        HALF=head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        KV_FP8=fp8.fp8,
        SOFT_FP8=software_fp8(key_cache),
        EARLY=pdl and (_EARLY_INPUTS if early_inputs is None else early_inputs),
        num_warps=4,
        **pdl_launch(pdl),
    )
    return q
