"""NeoX (rotate-half) rotary embedding, applied in place to q and k."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_cos_sin(pos_ptr, cos_sin_ptr, stride_cos_sin, t, HALF: tl.constexpr):
    """The float32 cos and sin rows (each ``[1, HALF]``) of token ``t``'s position."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    return _cos_sin_row(cos_sin_ptr, stride_cos_sin, pos, HALF)


@triton.jit
def _cos_sin_row(cos_sin_ptr, stride_cos_sin, pos, HALF: tl.constexpr):
    """The float32 cos and sin rows (each ``[1, HALF]``) of position ``pos``."""
    dims = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cos_sin + dims)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cos_sin + HALF + dims)[None, :]
    return cos, sin


@triton.jit
def rotate_pair(x1f, x2f, cos, sin):
    """The NeoX rotation of the float32 pair ``(x1, x2)``: ``(x1 cos - x2 sin, x2 cos + x1 sin)``,
    each product rounded to float32 on its own, then summed (what torch computes). Written out
    as ``a * b - c * d``, the compiler contracts one product and the sum into an FMA as it sees
    fit, so two kernels could round it differently (DECISIONS 124 saw one float32 ulp between
    two); each product here is an FMA with a +0.0 addend, which rounds once and which the
    compiler may neither contract further nor turn back into a multiply (``-0.0 + 0.0`` is
    ``+0.0``), so every kernel that rotates (rotary, rotary + K/V store, the qkv GEMV's epilogue)
    gets the same bits on every device, the CPU interpreter included."""
    p1 = tl.fma(x1f, cos, 0.0)
    p2 = tl.fma(x2f, sin, 0.0)
    p3 = tl.fma(x2f, cos, 0.0)
    p4 = tl.fma(x1f, sin, 0.0)
    return p1 - p2, p3 + p4


@triton.jit
def _rotate_heads(
    ptr, stride_t, stride_h, t, num_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr
):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF)
    mask = (heads < num_heads)[:, None]
    base = ptr + t * stride_t + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    lo, hi = rotate_pair(x1f, x2f, cos, sin)
    tl.store(base, lo.to(x1.dtype), mask=mask)
    tl.store(base + HALF, hi.to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cache,
    num_q_heads,
    num_k_heads,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _load_cos_sin(pos_ptr, cache_ptr, stride_cache, t, HALF)
    _rotate_heads(q_ptr, stride_qt, stride_qh, t, num_q_heads, cos, sin, HALF, BLOCK_HQ)
    _rotate_heads(k_ptr, stride_kt, stride_kh, t, num_k_heads, cos, sin, HALF, BLOCK_HK)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`kernels.reference.rotary_embedding`: rotates ``q`` and ``k`` in place.

    ``q``/``k`` may be strided views (e.g. slices of a fused qkv projection) as long as
    the head dim is unit-stride. Returns ``(q, k)``.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if head_dim & (head_dim - 1) or head_dim < 4:
        raise ValueError(f"rotary_embedding: head_dim must be a power of two >= 4, got {head_dim}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary_embedding: q and k need a unit-stride head dim to rotate in place")
    if num_tokens == 0:
        return q, k
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    _rotary_kernel[(num_tokens,)](
        positions,
        q,
        k,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        num_q_heads,
        num_k_heads,
        HALF=head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_k_heads),
        num_warps=4,
    )
    return q, k
