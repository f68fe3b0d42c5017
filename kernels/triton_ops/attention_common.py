"""What the paged prefill and decode attention kernels share.

Device side: ``@triton.jit`` helpers, which Triton inlines into each kernel, so a kernel
compiles to the same code as with the lines written out in place. Host side: the argument
checks, the output buffer and the stride arguments, which both kernels take in one order.

FP8 KV caches (``KV_FP8``, a constexpr: 16/32-bit caches compile to the code they had
before): K/V tiles are loaded as e4m3 and converted to the query's dtype (exact: every e4m3
value is a bf16/fp16/fp32 value); the K scale of the program's KV head is folded into the
score scale and the V scale multiplies the normalised output.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the kernels use exp2: scores are scaled by scale * LOG2E


class AttentionShape(NamedTuple):
    """Sizes of a checked attention call (``q``: ``[rows, Hq, D]``, caches ``[N, block_size, Hk, D]``)."""

    num_rows: int  # tokens (prefill) or sequences (decode)
    num_heads: int
    head_dim: int
    block_size: int
    num_kv_heads: int
    group: int  # query heads per KV head


def check_attention_inputs(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor
) -> AttentionShape:
    """Shared argument checks of the attention ops; returns the sizes they read."""
    num_rows, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"paged attention: head_dim must be a power of two >= 16, got {head_dim}")
    if block_size & (block_size - 1):
        raise ValueError(f"paged attention: block_size must be a power of two, got {block_size}")
    if num_heads % num_kv_heads:
        raise ValueError("paged attention: query heads must be a multiple of KV heads")
    if q.stride(-1) != 1 or not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("paged attention: q needs a unit-stride head dim and the caches must be contiguous")
    return AttentionShape(num_rows, num_heads, head_dim, block_size, num_kv_heads, num_heads // num_kv_heads)


class KVScaleArgs(NamedTuple):
    """The fp8 arguments of the attention and KV-store kernels."""

    fp8: bool  # the KV_FP8 constexpr
    k_scale: torch.Tensor  # float32 [1] or [Hk] (a placeholder for 16/32-bit caches)
    v_scale: torch.Tensor
    stride: int  # 0: one scale for every KV head, 1: one per KV head


def kv_scale_args(
    key_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    num_kv_heads: int,
    placeholder: torch.Tensor,
) -> KVScaleArgs:
    """Check and pack ``k_scale``/``v_scale`` (see :mod:`kernels.reference`) for the kernels."""
    if key_cache.dtype != torch.float8_e4m3fn:
        return KVScaleArgs(False, placeholder, placeholder, 0)
    if k_scale is None or v_scale is None:
        raise ValueError("an fp8 KV cache needs k_scale and v_scale")
    scales = []
    for s in (k_scale, v_scale):
        s = s.reshape(-1)
        if s.dtype != torch.float32 or s.numel() not in (1, num_kv_heads):
            raise ValueError(f"KV scales: float32 of 1 or {num_kv_heads} elements, got {s.dtype} {s.numel()}")
        scales.append(s if s.stride(0) == 1 else s.contiguous())
    if scales[0].numel() != scales[1].numel():
        raise ValueError("k_scale and v_scale must both be per tensor or both per head")
    return KVScaleArgs(True, scales[0], scales[1], 0 if scales[0].numel() == 1 else 1)


def output_like(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``out``, or a fresh contiguous tensor of ``q``'s shape and dtype."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out


def unit_stride_rows(block_tables: torch.Tensor) -> torch.Tensor:
    """``block_tables`` with unit stride along a row (the kernels take only the row stride)."""
    return block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()


def paged_strides(
    q: torch.Tensor, out: torch.Tensor, block_tables: torch.Tensor, key_cache: torch.Tensor
) -> tuple[int, int, int, int, int, int, int, int]:
    """The stride arguments of both kernels, in their order: ``q`` and ``out`` (row, head),
    ``block_tables`` (row), the caches (block, slot, KV head)."""
    return (
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
    )


@triton.jit
def row_offsets(tok, head, stride_t, stride_h):
    """Offsets of rows ``(tok, head)`` of a ``[tokens, heads, D]`` tensor (int64: no overflow)."""
    return tok.to(tl.int64) * stride_t + head * stride_h


@triton.jit
def load_rows(ptr, off, row_ok, dims):
    """``[rows, D]`` tile at row offsets ``off`` (``dims``: ``arange(0, D)``); rows not ``row_ok`` read 0."""
    return tl.load(ptr + off[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0)


@triton.jit
def store_rows(ptr, off, row_ok, dims, values):
    """Store ``values``, cast to ``ptr``'s dtype, where :func:`load_rows` reads (rows ``row_ok`` only)."""
    tl.store(ptr + off[:, None] + dims[None, :], values.to(ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def init_softmax_state(ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Running max (base 2), sum of weights and output accumulator of an online softmax."""
    # Finite "minus infinity" for the running max: keeps exp2(m_old - m_new) NaN-free for
    # rows whose keys are all masked so far (padding rows of the tile).
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    return m_i, l_i, acc


@triton.jit
def paged_kv_offsets(bt_row, kpos, k_ok, kv_head, stride_kb, stride_ks, stride_kh, BLOCK_SIZE: tl.constexpr,
                     CACHE: tl.constexpr = tl.constexpr("")):
    """Cache offsets of the keys at positions ``kpos`` of the sequence whose block-table row
    is ``bt_row``; ``k_ok`` masks the table reads (``None``: every position is valid);
    ``CACHE``: the table reads' cache modifier (``.cg``: past L1)."""
    if k_ok is None:
        block_id = tl.load(bt_row + kpos // BLOCK_SIZE, cache_modifier=CACHE).to(tl.int64)
    else:
        block_id = tl.load(bt_row + kpos // BLOCK_SIZE, mask=k_ok, other=0, cache_modifier=CACHE).to(tl.int64)
    return block_id * stride_kb + (kpos % BLOCK_SIZE) * stride_ks + kv_head * stride_kh


@triton.jit
def dot(a, b, IEEE_DOT: tl.constexpr):
    """``tl.dot``, in full float32 precision when ``IEEE_DOT`` (float32 inputs)."""
    if IEEE_DOT:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, IEEE_DOT: tl.constexpr):
    """Fold a tile of scores ``s`` (base 2, scaled and masked) and its values ``v`` into the
    running max ``m_i``, sum ``l_i`` and output ``acc``; returns the new three."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE_DOT)
    return m_new, l_i, acc
