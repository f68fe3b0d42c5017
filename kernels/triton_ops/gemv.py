"""One-token GEMVs (batch-1 decode): 16-bit, fp8 (W8A8 and W8A16) and grouped 4/8-bit (WnA16) weights.

At one token a linear layer is a stream of its weight bytes; these kernels are built to keep
that stream at the card's bandwidth:
- each program owns ``block_n`` output channels and one ``K`` range (split-K); it reads the
  activation tile once per ``block_k`` and multiplies it into all of its rows;
- products accumulate elementwise in a ``[block_n, block_k]`` float32 register tile and are
  reduced across threads once, after the loop: no cross-warp reduction (shared memory and a
  barrier) per tile, so a warp's next weight loads are not held behind one; with fp8 weights at
  one token each thread first sums its 16 products of one 16-byte load (``PART``,
  :func:`_dense_part`): a 16 times smaller tile, fewer registers, more warps resident;
- weight loads are marked evict-first and activation loads evict-last: the weights are read
  once, the activation by every program;
- ``pdl=True`` (:func:`gemv16`, :func:`gemv_fp8_weight_only`, :func:`gemv_wna16`; sm_90+):
  launched with programmatic dependent launch (:mod:`kernels.triton_ops.pdl`); the dense kernel
  reads its first weight tile before it waits for the kernel that writes the activation, the
  4/8-bit kernels wait first;
- split-K (``GemvTiles.split_k`` > 1) writes float32 partial sums ``[split_k, M, N]`` that
  :func:`_reduce_splits_kernel` adds in split order (deterministic: no atomics) before the
  epilogue; with one split the epilogue runs in the GEMV kernel; the 4-bit word kernel can
  instead count arrivals per row block (``counters``, :func:`_split_fixup`): the program that
  arrives last adds the splits in the same order, with no second launch;
- fp8 takes the activation already quantized (:func:`~kernels.triton_ops.fp8_matmul.quantize_fp8_per_token`,
  once per linear instead of once per program); e4m3 x e4m3 products are exact in float32, so
  the result differs from :func:`kernels.quant_reference.fp8_linear` only in the order of sums;
- fp8 weight-only (:func:`gemv_fp8_weight_only`) runs the same loop on the 16-bit activation
  (no quantization launch before it) with the weight's scale in the epilogue;
- 4-bit weights whose rows are whole int32 words (every GPTQ / GGUF layout we build) go to
  :func:`_gemv_int4_words_kernel`: each nibble is masked in place into a float's mantissa
  (:func:`_nibble_as_float`) and multiplied by its input, the group's scale once per word
  (1.54x the byte kernel below on an H200; docs/QUANTIZATION.md, "4-bit weights as int32 words");
  with ``pairs`` (symmetric weights, bf16 inputs, CUDA) two nibbles at a time become a bf16
  pair and meet their inputs in packed bf16 FMAs (:func:`~kernels.triton_ops.gemv_ptx.pairs_asm`:
  438 instead of 554 instructions per loop of 128 weights per thread; products and four-term
  sums round to bf16); with ``dp4a`` (two words per thread) the integer decode; the inline PTX
  of these decodes and of the loads in the word tile's layout is :mod:`kernels.triton_ops.gemv_ptx`;
- ``gated=True`` (one token, one split): the weight is ``[gate; up]``, a program reads gate row
  ``o`` and up row ``o + N / 2`` side by side (:func:`_gemv_rows`) and its epilogue applies
  SiLU-and-mul with the activation kernel's arithmetic (:func:`_gated_epilogue`): ``[1, N / 2]``,
  bit-for-bit the GEMV then ``silu_and_mul`` at the same tiling, in one launch;
- otherwise (8-bit, or ``words=False``) 4/8-bit integers become floats by the exponent trick
  (``bits | 0x4B000000`` read as float32 is ``2^23 + q``; subtracting ``2^23`` is exact),
  integer logic and one add instead of an int-to-float conversion, which runs at an eighth of
  the FMA rate on sm_90. With ``factored`` the group's scale multiplies the group's partial sum
  instead of each weight (``sum_k x_k (q_k s + o) = s sum_k x_k q_k + o sum_k x_k``): one FMA
  per weight. The weight is not rounded to the activation dtype first, as the reference does:
  the result differs from :func:`kernels.quant_reference.wna16_linear` by that rounding (at most
  the dtype's unit roundoff per weight: 2^-8 in bf16) and the order of sums.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import triton
import triton.language as tl

from kernels.rope_store import RopeStore
from kernels.triton_ops.activation import silu_and_mul, silu_mul_tile
from kernels.triton_ops.gemv_ptx import (
    dp4a_asm,
    load_groups_asm,
    load_inputs_asm,
    load_limbs_asm,
    load_pairs_asm,
    nibbles_asm,
    pairs_asm,
)
from kernels.triton_ops.pdl import pdl_begin, pdl_launch
from kernels.triton_ops.rotary import rotate_pair


@dataclass(frozen=True)
class GemvTiles:
    """Tiling of a one-token GEMV: output channels per program, inputs per tile, warps, and
    how many programs share one row's ``K`` (split-K)."""

    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    split_k: int = 1

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.split_k < 1 or self.num_warps < 1:
            raise ValueError("split_k and num_warps must be >= 1")


def rope_fits(n: int, k: int, tiles: GemvTiles, rope: RopeStore) -> bool:
    """Whether a one-token GEMV of an ``[n, k]`` weight at ``tiles`` can rotate and store ``rope``
    in its epilogue: the weight is the layer's ``[q; k; v]`` (``RopeStore.applies``) and each
    program holds whole rotary pairs (2+ rows, one split). The one test the GEMVs (which refuse
    otherwise) and the ops choosing them (which fall back otherwise) share."""
    return rope.applies(n) and tiles.block_n >= 2 and _k_per_split(k, tiles) >= k


def _rope_out(n: int, k: int, tiles: GemvTiles, x: torch.Tensor, rope: RopeStore, what: str) -> torch.Tensor:
    """The rotated q ``[1, Hq * D]`` a ``rope`` GEMV of an ``[n, k]`` weight writes, after checking
    that the tiling allows it (:func:`rope_fits`)."""
    if not rope_fits(n, k, tiles, rope):
        raise ValueError(f"{what}: rope needs a [q; k; v] weight (RopeStore.applies; {n} rows), "
                         f"block_n >= 2 ({tiles.block_n}) and one split ({tiles.split_k})")
    return torch.empty((1, rope.num_q_heads * rope.head_dim), dtype=x.dtype, device=x.device)


def _rope_args(rope: RopeStore | None) -> dict[str, Any]:
    """The GEMV kernels' ``ROPE`` arguments for ``rope`` (none without it: the kernels' defaults)."""
    if rope is None:
        return {}
    d = rope.head_dim
    return dict(pos_ptr=rope.positions, cos_sin_ptr=rope.cos_sin, stride_cs=rope.cos_sin.stride(0),
                slot_ptr=rope.slot_mapping, kc_ptr=rope.key_cache, vc_ptr=rope.value_cache,
                NQ=rope.num_q_heads * d, NKV=rope.num_kv_heads * d, ROPE=d // 2)


@triton.jit
def _epilogue(acc, rm, m_ok, rn, n_ok, pid_k, M, N, stride_om, part_ptr, out_ptr, xs_ptr, ws_ptr, bias_ptr,
              HAS_XS: tl.constexpr, HAS_WS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Store ``acc`` ``[BLOCK_M, BLOCK_N]``: partial sums (``[splits, M, N]`` float32) when
    ``SPLIT``, else ``acc (* xs[m]) (* ws[n]) (+ bias[n])`` in the output's dtype."""
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tl.store(part_ptr + (pid_k * M + rm)[:, None].to(tl.int64) * N + rn[None, :], acc, mask=ok)
    else:
        y = acc
        if HAS_XS:
            y = y * tl.load(xs_ptr + rm, mask=m_ok, other=0.0)[:, None]
        if HAS_WS:
            y = y * tl.load(ws_ptr + rn, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _reduce_splits_kernel(part_ptr, out_ptr, xs_ptr, ws_ptr, bias_ptr, M, N, stride_om, SPLITS,
                          HAS_XS: tl.constexpr, HAS_WS: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr):
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rm = tl.program_id(1) + tl.arange(0, 1)
    n_ok = rn < N
    m_ok = rm < M
    acc = _sum_splits(part_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], n_ok[None, :], M * N, SPLITS, "")
    _epilogue(acc, rm, m_ok, rn, n_ok, 0, M, N, stride_om, part_ptr, out_ptr, xs_ptr, ws_ptr, bias_ptr,
              HAS_XS, HAS_WS, HAS_BIAS, False)


@triton.jit
def _sum_splits(ptrs, mask, step, splits, CACHE: tl.constexpr):
    """The float32 partial sums at ``ptrs + s * step`` added in split order ``s = 0 .. splits - 1``:
    the one order :func:`_reduce_splits_kernel` and :func:`_split_fixup` both use (the same bits
    every run, and from either). ``CACHE``: the loads' cache modifier."""
    acc = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=CACHE)
    for s in range(1, splits):
        acc += tl.load(ptrs + s * step, mask=mask, other=0.0, cache_modifier=CACHE)
    return acc


@triton.jit
def _split_fixup(acc, rn, n_ok, N, part_ptr, cnt_ptr, out_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    """One token's split-K without a second launch: this program stores its split's float32 sums
    ``acc`` ``[BLOCK_N]`` (``part_ptr``: ``[splits, 1, N]``) and counts its arrival in
    ``cnt_ptr[row block]``; the program that arrives last adds every split's sums in split order
    (:func:`_reduce_splits_kernel`'s order: the same bits), stores the result and sets the count
    back to 0 for the next launch (a CUDA graph replays it)."""
    blk = tl.program_id(0)
    splits = tl.num_programs(1)
    tl.store(part_ptr + tl.program_id(1) * N + rn, acc, mask=n_ok)
    # Every thread's stores come before the count (one thread performs a scalar atomic; its
    # release orders what the barrier ordered before it); the last arrival's acquire makes every
    # split's stores visible to it, read past L1 (.cg).
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + blk, 1, sem="acq_rel", scope="gpu")
    if arrived == splits - 1:
        total = _sum_splits(part_ptr + rn, n_ok, N, splits, ".cg")
        rm = tl.arange(0, 1)
        _epilogue(total[None, :], rm, rm < 1, rn, n_ok, 0, 1, N, N, part_ptr, out_ptr, out_ptr, out_ptr,
                  bias_ptr, False, False, HAS_BIAS, False)
        tl.atomic_xchg(cnt_ptr + blk, 0, sem="relaxed", scope="gpu")


@triton.jit
def _gemv_rows(N, BLOCK_N: tl.constexpr, GATED: tl.constexpr, ROPE: tl.constexpr = 0):
    """The weight rows this program reads (``[BLOCK_N]``) and which exist. ``GATED``: the weight
    is ``[gate; up]`` (``N`` rows, gate rows ``< N / 2``) and the program owns outputs
    ``pid * BLOCK_N / 2 + i``, reading gate row ``o`` and up row ``o + N / 2`` of each, paired in
    the tile (rows ``2i`` and ``2i + 1``) for :func:`_gated_epilogue`; the tile holds ``BLOCK_N``
    weight rows either way, so a tiling reads the same bytes per program gated or not.
    ``ROPE`` (half the head dim, > 0): the weight is ``[q; k; v]`` by heads of ``2 ROPE`` rows and
    the program owns rotary pairs ``j = pid * BLOCK_N / 2 + i``, rows ``h * 2 ROPE + d`` and
    ``+ ROPE`` (``h = j // ROPE``, ``d = j % ROPE``), paired in the tile for :func:`_rope_epilogue`."""
    r = tl.arange(0, BLOCK_N)
    if ROPE > 0:
        j = tl.program_id(0) * (BLOCK_N // 2) + r // 2
        return (j // ROPE) * (2 * ROPE) + j % ROPE + (r % 2) * ROPE, j < N // 2
    if GATED:
        o = tl.program_id(0) * (BLOCK_N // 2) + r // 2
        return o + (r % 2) * (N // 2), o < N // 2
    rn = tl.program_id(0) * BLOCK_N + r
    return rn, rn < N


@triton.jit
def _gated_epilogue(acc, rows, ok, N, out_ptr, xs_ptr, ws_ptr, bias_ptr, HAS_XS: tl.constexpr,
                    HAS_WS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """SiLU-and-mul in the epilogue of a one-token ``[gate; up]`` GEMV (rows from
    :func:`_gemv_rows` with ``GATED``): each row's sum is scaled and rounded to the output dtype
    exactly as :func:`_epilogue` stores it, then paired gate/up values go through the activation
    kernel's own :func:`~kernels.triton_ops.activation.silu_mul_tile`, so the result is bit-for-bit
    the unfused GEMV followed by ``silu_and_mul``, without writing and reading the ``2 I`` values."""
    y = acc
    if HAS_XS:
        y = y * tl.load(xs_ptr)
    if HAS_WS:
        y = y * tl.load(ws_ptr + rows, mask=ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    gate, up = tl.split(tl.reshape(y.to(out_ptr.dtype.element_ty), [BLOCK_N // 2, 2]))
    o = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(out_ptr + o, silu_mul_tile(gate, up).to(out_ptr.dtype.element_ty), mask=o < N // 2)


@triton.jit
def _rope_inputs(pos_ptr, cos_sin_ptr, stride_cs, slot_ptr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr):
    """The one token's cos and sin of this program's rotary pairs (float32 ``[BLOCK_N / 2]``) and
    its cache slot: what only the host writes before the step (the position, the slot) or no one
    (the table), so :func:`_rope_epilogue`'s GEMV reads them before its PDL wait, past L1."""
    pos = tl.load(pos_ptr, cache_modifier=".cg").to(tl.int64)
    slot = tl.load(slot_ptr, cache_modifier=".cg").to(tl.int64)
    d = (tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)) % ROPE
    row = cos_sin_ptr + pos * stride_cs
    return tl.load(row + d), tl.load(row + ROPE + d), slot


@triton.jit
def _rope_epilogue(acc, rows, ok, out_ptr, ws_ptr, bias_ptr, cos, sin, slot, kc_ptr, vc_ptr, NQ, NKV,
                   HAS_WS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr):
    """Rotary + K/V store in the epilogue of a one-token ``[q; k; v]`` GEMV (rows from
    :func:`_gemv_rows` with ``ROPE``): each row's sum (``* ws``, an fp8 weight's per-channel
    scale; ``+ bias``) is rounded to the output dtype as :func:`_epilogue` stores it, then the
    pair is rotated with
    :func:`~kernels.triton_ops.rotary_kv.rotary_store_kvcache`'s arithmetic: q rows (``< NQ``) into
    ``out`` (``[1, NQ]``), k rows rotated and v rows as they are into the caches at ``slot``
    (``NKV`` elements per slot; a negative slot stores nothing). Bit for bit the GEMV followed by
    ``rotary_store_kvcache``, without writing and reading the ``NQ + 2 NKV`` values."""
    y = acc
    if HAS_WS:
        y = y * tl.load(ws_ptr + rows, mask=ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    x1, x2 = tl.split(tl.reshape(y.to(out_ptr.dtype.element_ty), [BLOCK_N // 2, 2]))
    r1, r2 = tl.split(tl.reshape(rows, [BLOCK_N // 2, 2]))
    pair_ok = tl.max(tl.reshape(ok.to(tl.int32), [BLOCK_N // 2, 2]), axis=1) > 0
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    o1, o2 = rotate_pair(x1f, x2f, cos, sin)
    o1 = o1.to(x1.dtype)
    o2 = o2.to(x1.dtype)
    is_q = pair_ok & (r1 < NQ)
    tl.store(out_ptr + r1, o1, mask=is_q)
    tl.store(out_ptr + r2, o2, mask=is_q)
    kv_ok = pair_ok & (r1 >= NQ) & (tl.full([BLOCK_N // 2], 0, tl.int64) + slot >= 0)
    base = slot * NKV - NQ
    is_k = kv_ok & (r1 < NQ + NKV)
    tl.store(kc_ptr + base + r1, o1.to(kc_ptr.dtype.element_ty), mask=is_k)
    tl.store(kc_ptr + base + r2, o2.to(kc_ptr.dtype.element_ty), mask=is_k)
    is_v = kv_ok & (r1 >= NQ + NKV)
    tl.store(vc_ptr + base - NKV + r1, x1.to(vc_ptr.dtype.element_ty), mask=is_v)
    tl.store(vc_ptr + base - NKV + r2, x2.to(vc_ptr.dtype.element_ty), mask=is_v)


@triton.jit
def _weight_tile(w_rows, k0, k_hi, n_ok, BLOCK_K: tl.constexpr):
    """The weight tile at inputs ``k0 .. k0 + BLOCK_K`` (``[BLOCK_N, BLOCK_K]``, 0 past ``k_hi``
    and past the last row), read once: evict-first."""
    kk = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & (kk < k_hi)[None, :], other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _tile_part(x_ptr, w, k0, k_hi, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PART: tl.constexpr):
    """One token's float32 products with weight tile ``w`` (inputs ``k0 .. k0 + BLOCK_K``),
    ``[BLOCK_N, BLOCK_K]``; summed in runs of ``PART`` consecutive inputs when ``PART``
    (``[BLOCK_N, BLOCK_K / PART]``): each thread holds a 16-byte load's run of 8-bit weights, so
    the sum stays in the thread and the loop's accumulator is ``PART`` times smaller (fewer
    registers, more programs resident, more loads in flight; DECISIONS 133)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + kk, mask=kk < k_hi, other=0.0, eviction_policy="evict_last").to(tl.float32)
    p = x[None, :] * w.to(tl.float32)
    if PART:
        p = tl.sum(tl.reshape(p, [BLOCK_N, BLOCK_K // PART, PART]), axis=2)
    return p


@triton.jit
def _dense_part(x_ptr, w_rows, k0, k_hi, n_ok, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PART: tl.constexpr):
    """:func:`_tile_part` of the weight tile at ``k0``."""
    return _tile_part(x_ptr, _weight_tile(w_rows, k0, k_hi, n_ok, BLOCK_K), k0, k_hi, BLOCK_N, BLOCK_K, PART)


@triton.jit
def _block_scaled(p, ws_ptr, rn, n_ok, k0, K, BLOCK_K: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
                  SG: tl.constexpr):
    """``p`` ``[BLOCK_N, W]`` (products or per-thread sums of inputs ``k0 .. k0 + BLOCK_K``, in
    order) times each one's block scale: ``ws`` ``[ceil(N / SBN), ceil(K / SBK)]`` (row
    ``n // SBN``, column ``k // SBK``). ``SG``: the ``SBK`` blocks one tile spans (1 when the
    tile lies inside one block: ``SBK`` and ``BLOCK_K`` are powers of two, tiles start at
    multiples of ``BLOCK_K``)."""
    kb_count = tl.cdiv(K, SBK)
    kb = k0 // SBK + tl.arange(0, SG)
    s = tl.load(ws_ptr + (rn // SBN).to(tl.int64)[:, None] * kb_count + kb[None, :],
                mask=n_ok[:, None] & (kb < kb_count)[None, :], other=0.0)
    if SG == 1:
        return p * s
    p3 = tl.reshape(p, [p.shape[0], SG, p.shape[1] // SG])
    return tl.reshape(p3 * s[:, :, None], [p.shape[0], p.shape[1]])


@triton.jit
def _gemv_dense_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr, M, N, K, K_PER_SPLIT,
                       stride_xm, stride_wn, stride_om, HAS_XS: tl.constexpr, HAS_WS: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr,
                       PART: tl.constexpr = 0, PDL: tl.constexpr = False, SBN: tl.constexpr = 0,
                       SBK: tl.constexpr = 0, SG: tl.constexpr = 1, pos_ptr=None, cos_sin_ptr=None,
                       stride_cs=0, slot_ptr=None, kc_ptr=None, vc_ptr=None, NQ=0, NKV=0,
                       ROPE: tl.constexpr = 0):
    # 16/32-bit weights (no scales); fp8 weights on 16/32-bit activations (W8A16: HAS_WS, the
    # per-channel scale in the epilogue); fp8 W8A8 on quantized activations (HAS_XS and HAS_WS:
    # the per-token and per-channel scales; e4m3 x e4m3 products are exact in float32).
    # SBN > 0: block-wise fp8 weights on 16/32-bit activations, ws_ptr the [N / SBN, K / SBK]
    # block scales, each tile's products scaled in the loop (_block_scaled; HAS_WS is False).
    # GATED (one token, one split): SiLU-and-mul of a [gate; up] weight (_gemv_rows).
    # PART (one token): products summed per thread in runs of PART inputs (_dense_part).
    # ROPE (one token, one split; half the head dim): rotary + K/V store in the epilogue
    # (_rope_epilogue), the position, slot and cos/sin read before the PDL wait (_rope_inputs).
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)  # every token (M <= BLOCK_M): each weight byte is read once
    rn, n_ok = _gemv_rows(N, BLOCK_N, GATED, ROPE)
    m_ok = rm < M
    x_rows = xq_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    if BLOCK_M == 1:  # a [BLOCK_N, BLOCK_K] tile: the 3-D one with one row compiles 1.9x slower
        # The first tile is read before the loop (every split has one): a tile that holds the
        # whole row (the one-token 16-bit tiling, linear16_tiles) is then straight-line loads,
        # all in flight at once. Read in the loop, the same tiling measured 32-37% slower on an
        # H200 (qkv 17.9 against 13.1 us, gate_up 69.2 against 52.6; docs/QUANTIZATION.md).
        # PDL: the first weight tile is read before waiting for the kernel that writes x.
        w0 = _weight_tile(w_rows, k_lo, k_hi, n_ok, BLOCK_K)
        if ROPE > 0:
            cos, sin, slot = _rope_inputs(pos_ptr, cos_sin_ptr, stride_cs, slot_ptr, BLOCK_N, ROPE)
        pdl_begin(PDL)
        acc1 = _tile_part(xq_ptr, w0, k_lo, k_hi, BLOCK_N, BLOCK_K, PART)
        if SBN > 0:
            acc1 = _block_scaled(acc1, ws_ptr, rn, n_ok, k_lo, K, BLOCK_K, SBN, SBK, SG)
        for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
            part = _dense_part(xq_ptr, w_rows, k0, k_hi, n_ok, BLOCK_N, BLOCK_K, PART)
            if SBN > 0:
                part = _block_scaled(part, ws_ptr, rn, n_ok, k0, K, BLOCK_K, SBN, SBK, SG)
            acc1 += part
        if ROPE > 0:
            _rope_epilogue(tl.sum(acc1, axis=1), rn, n_ok, out_ptr, ws_ptr, bias_ptr, cos, sin, slot, kc_ptr,
                           vc_ptr, NQ, NKV, HAS_WS, HAS_BIAS, BLOCK_N, ROPE)
        elif GATED:
            _gated_epilogue(tl.sum(acc1, axis=1), rn, n_ok, N, out_ptr, xs_ptr, ws_ptr, bias_ptr,
                            HAS_XS, HAS_WS, HAS_BIAS, BLOCK_N)
        else:
            _epilogue(tl.sum(acc1, axis=1)[None, :], rm, m_ok, rn, n_ok, pid_k, M, N, stride_om, part_ptr,
                      out_ptr, xs_ptr, ws_ptr, bias_ptr, HAS_XS, HAS_WS, HAS_BIAS, SPLIT)
    else:
        pdl_begin(PDL)
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < k_hi
            x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_last").to(tl.float32)
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            if SBN > 0:
                w = _block_scaled(w, ws_ptr, rn, n_ok, k0, K, BLOCK_K, SBN, SBK, SG)
            acc += x[:, None, :] * w[None, :, :]
        _epilogue(tl.sum(acc, axis=2), rm, m_ok, rn, n_ok, pid_k, M, N, stride_om, part_ptr, out_ptr,
                  xs_ptr, ws_ptr, bias_ptr, HAS_XS, HAS_WS, HAS_BIAS, SPLIT)


@triton.jit
def _int_as_float(b, SUB: tl.constexpr):
    """``b`` (int32 holding 0..255) as float32 ``b - SUB``, exact, without an int-to-float conversion."""
    return (b | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + SUB)


@triton.jit
def _int_program_rows(q_ptr, s_ptr, o_ptr, N, K, K_PER_SPLIT, stride_qn, stride_sn, BLOCK_N: tl.constexpr,
                      GATED: tl.constexpr, ROPE: tl.constexpr = 0):
    """This program's rows of an integer GEMV (grid: row blocks x splits): the row indices and
    their mask (:func:`_gemv_rows`), ``[BLOCK_N, 1]`` pointers to each row's weights, scales and
    offsets, and the ``K`` range ``[k_lo, k_hi)`` of its split."""
    rn, n_ok = _gemv_rows(N, BLOCK_N, GATED, ROPE)
    rn64 = rn.to(tl.int64)[:, None]
    k_lo = tl.program_id(1) * K_PER_SPLIT
    return (rn, n_ok, q_ptr + rn64 * stride_qn, s_ptr + rn64 * stride_sn, o_ptr + rn64 * stride_sn,
            k_lo, tl.minimum(k_lo + K_PER_SPLIT, K))


@triton.jit
def _gemv_int_kernel(x_ptr, q_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, part_ptr, M, N, K, K_PER_SPLIT,
                     stride_qn, stride_sn,
                     BITS: tl.constexpr, GROUP: tl.constexpr, SUB: tl.constexpr, SIGNED8: tl.constexpr,
                     HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, FACTORED: tl.constexpr,
                     SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PDL: tl.constexpr = False):
    # GROUP and BLOCK_K divide one another; a tile holds TILE_G groups (or part of one) of G_W inputs.
    # (Multiplying the low nibbles by the even inputs and the high ones by the odd inputs instead
    # of interleaving measured 15% slower on an H200.)
    TILE_G: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
    G_W: tl.constexpr = BLOCK_K // TILE_G
    rn, n_ok, q_rows, s_rows, o_rows, k_lo, k_hi = _int_program_rows(
        q_ptr, s_ptr, o_ptr, N, K, K_PER_SPLIT, stride_qn, stride_sn, BLOCK_N, False)
    pdl_begin(PDL)
    gg = tl.arange(0, TILE_G)
    if FACTORED:
        acc = tl.zeros([BLOCK_N, TILE_G], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        g_ok = n_ok[:, None] & (k0 + gg * (BLOCK_K // TILE_G) < k_hi)[None, :]
        s = tl.load(s_rows + (k0 // GROUP + gg)[None, :], mask=g_ok, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            o = tl.load(o_rows + (k0 // GROUP + gg)[None, :], mask=g_ok, other=0.0).to(tl.float32)
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_hi
        x = tl.load(x_ptr + kk, mask=k_ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
        if BITS == 4:
            jj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b = tl.load(q_rows + jj[None, :], mask=n_ok[:, None] & (2 * jj < k_hi)[None, :], other=0,
                        eviction_policy="evict_first").to(tl.int32)
            b = tl.interleave(b & 0xF, b >> 4)  # byte j holds inputs 2j (low nibble) and 2j + 1
        else:
            b = tl.load(q_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0,
                        eviction_policy="evict_first").to(tl.int32)
            if SIGNED8:
                b += 128
        q = _int_as_float(b, SUB)
        if FACTORED:
            p = x[None, :] * q
        else:
            w3 = tl.reshape(q, [BLOCK_N, TILE_G, G_W]) * s[:, :, None]
            if HAS_OFFSET:
                w3 += o[:, :, None]
            p = x[None, :] * tl.reshape(w3, [BLOCK_N, BLOCK_K])
        if FACTORED:
            # s * sum(x q) (+ o * sum(x)) per group of the tile.
            part = tl.sum(tl.reshape(p, [BLOCK_N, TILE_G, G_W]), axis=2) * s
            if HAS_OFFSET:
                part += o * tl.sum(tl.reshape(x, [TILE_G, G_W]), axis=1)[None, :]
            acc += part
        else:
            acc += p
    rm = tl.arange(0, 1)
    _epilogue(tl.sum(acc, axis=1)[None, :], rm, rm < 1, rn, n_ok, tl.program_id(1), 1, N, N, part_ptr,
              out_ptr, out_ptr, out_ptr, bias_ptr, False, False, HAS_BIAS, SPLIT)


@triton.jit
def _nibble_as_float(w, SHIFT: tl.constexpr, SUB: tl.constexpr):
    """The 4-bit field at bits ``SHIFT .. SHIFT + 3`` of int32 ``w`` (``SHIFT <= 16``) as float32
    ``q - SUB``, exact: the field becomes the low mantissa bits of a float whose exponent gives
    them unit weight (``2^(23 - SHIFT) + q``), one AND-OR (LOP3) and one add, no shift."""
    f = ((w & (0xF << SHIFT)) | ((150 - SHIFT) << 23)).to(tl.float32, bitcast=True)
    return f - ((1 << (23 - SHIFT)) + SUB)


@triton.jit
def _load_pair(xw, LANE: tl.constexpr, jj, w_hi, EVEN: tl.constexpr):
    """Inputs ``8 jj + LANE`` and ``8 jj + LANE + 4`` (bf16) as one int32, the first in the low half."""
    if EVEN:
        lo = tl.load(xw + LANE, eviction_policy="evict_last")
        hi = tl.load(xw + LANE + 4, eviction_policy="evict_last")
    else:
        lo = tl.load(xw + LANE, mask=jj < w_hi, other=0.0, eviction_policy="evict_last")
        hi = tl.load(xw + LANE + 4, mask=jj < w_hi, other=0.0, eviction_policy="evict_last")
    lo = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = hi.to(tl.int16, bitcast=True).to(tl.int32) << 16
    return lo | hi


@triton.jit
def _load_words(q_rows, jj, n_ok, w_hi, EVEN: tl.constexpr):
    """Words ``jj`` of every row (``EVEN``: unmasked; else rows past N and words past ``w_hi`` read 0)."""
    if EVEN:
        return tl.load(q_rows + jj[None, :], eviction_policy="evict_first")
    return tl.load(q_rows + jj[None, :], mask=n_ok[:, None] & (jj < w_hi)[None, :], other=0,
                   eviction_policy="evict_first")


@triton.jit
def _load_input(xw, NIBBLE: tl.constexpr, jj, w_hi, EVEN: tl.constexpr):
    """Input ``8 jj + NIBBLE`` of each word as float32 (0 past the last word)."""
    if EVEN:
        return tl.load(xw + NIBBLE, eviction_policy="evict_last").to(tl.float32)
    return tl.load(xw + NIBBLE, mask=jj < w_hi, other=0.0, eviction_policy="evict_last").to(tl.float32)


@triton.jit
def _load_groups(rows, k0, gg, ok, GROUP: tl.constexpr, EVEN: tl.constexpr):
    """The scale (or offset) of each of the tile's groups, float32 ``[rows, groups]``."""
    if EVEN:
        return tl.load(rows + (k0 // GROUP + gg)[None, :]).to(tl.float32)
    return tl.load(rows + (k0 // GROUP + gg)[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _word_sums(w, xw, jj, w_hi, token, SUB: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr,
               XLOAD: tl.constexpr, F16: tl.constexpr):
    """Each word's eight products ``(q_i - SUB) x_i`` summed in float32 (``[rows, words]``), and
    each word's eight inputs summed (``[words]``, for offsets). ``XLOAD``: the inputs read in
    inline PTX (:func:`load_inputs_asm`)."""
    if XLOAD:
        x0, x1, x2, x3, x4, x5, x6, x7 = load_inputs_asm(xw, token, F16)
    else:
        x0 = _load_input(xw, 0, jj, w_hi, EVEN)
        x1 = _load_input(xw, 1, jj, w_hi, EVEN)
        x2 = _load_input(xw, 2, jj, w_hi, EVEN)
        x3 = _load_input(xw, 3, jj, w_hi, EVEN)
        x4 = _load_input(xw, 4, jj, w_hi, EVEN)
        x5 = _load_input(xw, 5, jj, w_hi, EVEN)
        x6 = _load_input(xw, 6, jj, w_hi, EVEN)
        x7 = _load_input(xw, 7, jj, w_hi, EVEN)
    if ASM:  # the same floats, fewer instructions (nibbles_asm)
        q0, q1, q2, q3, q4, q5, q6, q7 = nibbles_asm(w, SUB)
    else:
        h = w >> 20  # nibbles 5, 6, 7 at bits 0, 4, 8 (the sign bits above are masked off)
        q0 = _nibble_as_float(w, 0, SUB)
        q1 = _nibble_as_float(w, 4, SUB)
        q2 = _nibble_as_float(w, 8, SUB)
        q3 = _nibble_as_float(w, 12, SUB)
        q4 = _nibble_as_float(w, 16, SUB)
        q5 = _nibble_as_float(h, 0, SUB)
        q6 = _nibble_as_float(h, 4, SUB)
        q7 = _nibble_as_float(h, 8, SUB)
    t = x0[None, :] * q0
    t += x1[None, :] * q1
    t += x2[None, :] * q2
    t += x3[None, :] * q3
    t += x4[None, :] * q4
    t += x5[None, :] * q5
    t += x6[None, :] * q6
    t += x7[None, :] * q7
    return t, x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7


@triton.jit
def _words_tile(acc, w, jj, k0, k_hi, w_hi, x_ptr, token, s_rows, o_rows, n_ok, GROUP: tl.constexpr,
                SUB: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN: tl.constexpr, ASM: tl.constexpr, PAIRS: tl.constexpr, XLOAD: tl.constexpr,
                DP4A: tl.constexpr = 0):
    """``acc`` (``[BLOCK_N, groups, words per group]``) plus the tile of words ``w`` (words ``jj``,
    inputs from ``k0``): its inputs' loads, the words' sums, their groups' scales (and offsets).
    ``DP4A`` (with ``PAIRS`` and ``XLOAD``; 2, each thread's words taken two at a time, or 0):
    the integer decode (:func:`~kernels.triton_ops.gemv_ptx.limbs_ptx`,
    :func:`~kernels.triton_ops.gemv_ptx.dp4a_ptx`)."""
    WORDS: tl.constexpr = BLOCK_K // 8
    TILE_G: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
    WPG: tl.constexpr = WORDS // TILE_G
    gg = tl.arange(0, TILE_G)
    xw = x_ptr + 8 * jj
    F16: tl.constexpr = x_ptr.dtype.element_ty == tl.float16
    if PAIRS and XLOAD and DP4A:
        tl.static_assert((SUB == 8.0) and (not HAS_OFFSET) and (DP4A == 2), "DP4A: two words, symmetric")
        l0, l1, h0, h1, unit = load_limbs_asm(xw, token, F16)
        t = dp4a_asm(w, l0[None, :], l1[None, :], h0[None, :], h1[None, :], unit[None, :])
    elif PAIRS and XLOAD:
        tl.static_assert((SUB == 8.0) and (not HAS_OFFSET), "PAIRS takes symmetric weights")
        p0, p1, p2, p3 = load_pairs_asm(xw, token)
        t = pairs_asm(w, p0[None, :], p1[None, :], p2[None, :], p3[None, :], F16)
    elif PAIRS:
        tl.static_assert((SUB == 8.0) and (not HAS_OFFSET), "PAIRS takes symmetric weights")
        t = pairs_asm(w, _load_pair(xw, 0, jj, w_hi, EVEN)[None, :],
                       _load_pair(xw, 1, jj, w_hi, EVEN)[None, :],
                       _load_pair(xw, 2, jj, w_hi, EVEN)[None, :],
                       _load_pair(xw, 3, jj, w_hi, EVEN)[None, :], F16)
    else:
        t, xsum = _word_sums(w, xw, jj, w_hi, token, SUB, EVEN, ASM, XLOAD, F16)
    g_ok = n_ok[:, None] & (k0 + gg * (BLOCK_K // TILE_G) < k_hi)[None, :]
    if XLOAD:
        s = load_groups_asm(s_rows + (k0 // GROUP + gg)[None, :])
    else:
        s = _load_groups(s_rows, k0, gg, g_ok, GROUP, EVEN)
    if PAIRS and F16 and not DP4A:  # the float16 pair sums are a sixteenth of the word's (pairs_ptx)
        s = s * 16.0
    acc += tl.reshape(t, [BLOCK_N, TILE_G, WPG]) * s[:, :, None]
    if HAS_OFFSET:
        if XLOAD:
            o = load_groups_asm(o_rows + (k0 // GROUP + gg)[None, :])
        else:
            o = _load_groups(o_rows, k0, gg, g_ok, GROUP, EVEN)
        acc += o[:, :, None] * tl.reshape(xsum, [TILE_G, WPG])[None, :, :]
    return acc


@triton.jit
def _gemv_int4_words_kernel(x_ptr, q_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, part_ptr, M, N, K, K_PER_SPLIT,
                            stride_qn, stride_sn, cnt_ptr,
                            GROUP: tl.constexpr, SUB: tl.constexpr, HAS_OFFSET: tl.constexpr,
                            HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, EVEN: tl.constexpr, GATED: tl.constexpr,
                            ASM: tl.constexpr, PAIRS: tl.constexpr, PDL: tl.constexpr = False,
                            PEEL: tl.constexpr = False, XLOAD: tl.constexpr = False,
                            FIXUP: tl.constexpr = False, pos_ptr=None, cos_sin_ptr=None, stride_cs=0,
                            slot_ptr=None, kc_ptr=None, vc_ptr=None, NQ=0, NKV=0,
                            ROPE: tl.constexpr = 0, DP4A: tl.constexpr = 0):
    # 4-bit weights read as int32 words (``q_ptr``: [N, K / 8] int32, ``stride_qn`` in words):
    # word j holds inputs 8j .. 8j + 7, input 8j + i in bits 4i .. 4i + 3 (bytes little-endian,
    # low nibble first). Each nibble is masked in place (_nibble_as_float) and multiplied by the
    # input it belongs to, loaded with stride 8 (activation loads hit L1: every program reads
    # the same tile), so no byte extraction, shift per weight or interleave. A word's eight
    # products sum in ``t``; its group's scale multiplies the word's sum (and the offset the
    # word's activation sum), one FMA per word. EVEN: whole tiles only (BLOCK_N divides N,
    # BLOCK_K divides K, the split length divides K): no masks. GATED: see _gemv_rows. PAIRS
    # (CUDA, 16-bit inputs, symmetric): a word's sum in packed 16-bit arithmetic (pairs_asm).
    # PEEL: the first tile is taken before the loop, its words read before the PDL wait (as the
    # dense kernel's). FIXUP (with SPLIT): the last split to finish adds the partial sums
    # (_split_fixup, ``cnt_ptr``: one int32 count per row block, 0 between launches). ROPE (half
    # the head dim; one split): rotary + K/V store in the epilogue (_rope_epilogue), the position,
    # slot and cos/sin read before the PDL wait (_rope_inputs).
    WORDS: tl.constexpr = BLOCK_K // 8
    TILE_G: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
    WPG: tl.constexpr = WORDS // TILE_G  # words of one group in a tile
    rn, n_ok, q_rows, s_rows, o_rows, k_lo, k_hi = _int_program_rows(
        q_ptr, s_ptr, o_ptr, N, K, K_PER_SPLIT, stride_qn, stride_sn, BLOCK_N, GATED, ROPE)
    w_hi = k_hi // 8
    acc = tl.zeros([BLOCK_N, TILE_G, WPG], dtype=tl.float32)
    k_start = k_lo
    if ROPE > 0:
        cos, sin, slot = _rope_inputs(pos_ptr, cos_sin_ptr, stride_cs, slot_ptr, BLOCK_N, ROPE)
    if PEEL:  # the first tile's words are read before the PDL wait (weights only)
        jj = k_lo // 8 + tl.arange(0, WORDS)
        w = _load_words(q_rows, jj, n_ok, w_hi, EVEN)
        token = pdl_begin(PDL)
        acc = _words_tile(acc, w, jj, k_lo, k_hi, w_hi, x_ptr, token, s_rows, o_rows, n_ok, GROUP, SUB,
                          HAS_OFFSET, BLOCK_N, BLOCK_K, EVEN, ASM, PAIRS, XLOAD, DP4A)
        k_start = k_lo + BLOCK_K
    else:
        token = pdl_begin(PDL)
    for k0 in range(k_start, k_hi, BLOCK_K):
        jj = k0 // 8 + tl.arange(0, WORDS)
        w = _load_words(q_rows, jj, n_ok, w_hi, EVEN)
        acc = _words_tile(acc, w, jj, k0, k_hi, w_hi, x_ptr, token, s_rows, o_rows, n_ok, GROUP, SUB,
                          HAS_OFFSET, BLOCK_N, BLOCK_K, EVEN, ASM, PAIRS, XLOAD, DP4A)
    rm = tl.arange(0, 1)
    if ROPE > 0:
        _rope_epilogue(tl.sum(tl.sum(acc, axis=2), axis=1), rn, n_ok, out_ptr, out_ptr, bias_ptr, cos, sin,
                       slot, kc_ptr, vc_ptr, NQ, NKV, False, HAS_BIAS, BLOCK_N, ROPE)
    elif GATED:
        _gated_epilogue(tl.sum(tl.sum(acc, axis=2), axis=1), rn, n_ok, N, out_ptr, out_ptr, out_ptr, bias_ptr,
                        False, False, HAS_BIAS, BLOCK_N)
    elif SPLIT and FIXUP:
        _split_fixup(tl.sum(tl.sum(acc, axis=2), axis=1), rn, n_ok, N, part_ptr, cnt_ptr, out_ptr, bias_ptr,
                     HAS_BIAS)
    else:
        _epilogue(tl.sum(tl.sum(acc, axis=2), axis=1)[None, :], rm, rm < 1, rn, n_ok, tl.program_id(1), 1, N,
                  N, part_ptr, out_ptr, out_ptr, out_ptr, bias_ptr, False, False, HAS_BIAS, SPLIT)


def k_per_split(k: int, splits: int, block_k: int) -> int:
    """Inputs per split of ``k`` into at most ``splits`` ranges, a multiple of ``block_k`` (so
    ``cdiv(k, k_per_split(...))`` ranges remain)."""
    return triton.cdiv(triton.cdiv(k, splits), block_k) * block_k


def _k_per_split(k: int, tiles: GemvTiles) -> int:
    """Inputs per split of a GEMV at ``tiles``."""
    return k_per_split(k, tiles.split_k, tiles.block_k)


def _launch(kernel: triton.JITFunction, args: tuple[object, ...], m: int, n: int, k: int, out: torch.Tensor,
            xs: torch.Tensor | None, ws: torch.Tensor | None, bias: torch.Tensor | None, tiles: GemvTiles,
            pdl: bool = False, counters: torch.Tensor | None = None, **meta: object) -> torch.Tensor:
    """Launch ``kernel`` on a (row blocks, splits) grid; with several splits, their sums added by
    :func:`reduce_splits`, or in the kernel (``counters``: the word kernel's FIXUP)."""
    per_split = _k_per_split(k, tiles)
    split = triton.cdiv(k, per_split)
    part = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=out.device)
    fixup = split > 1 and counters is not None
    if fixup:
        meta.update(cnt_ptr=counters, FIXUP=True)
    kernel[(triton.cdiv(n, tiles.block_n), split)](
        *args, out, part, m, n, k, per_split, **meta,
        HAS_BIAS=bias is not None, SPLIT=split > 1,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, **pdl_launch(pdl),
    )
    if split > 1 and not fixup:
        reduce_splits(part, out, bias, xs, ws)
    return out


def split_counters(n: int, tiles: GemvTiles, device: torch.device | str) -> torch.Tensor:
    """The arrival counts :func:`gemv_wna16` (``counters``) needs for ``n`` outputs at ``tiles``:
    int32 zeros, one per row block; each launch leaves them 0. One set per call site: two
    launches that may run at once must not share them."""
    return torch.zeros(triton.cdiv(n, tiles.block_n), dtype=torch.int32, device=device)


def reduce_splits(part: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None,
                  xs: torch.Tensor | None = None, ws: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` ``[M, N]`` (unit last stride) = the float32 partial sums ``part`` ``[splits, M, N]``
    added in split order (the same bits every run) ``(* xs[m]) (* ws[n]) (+ bias[n])``, rounded to
    ``out``'s dtype."""
    splits, m, n = part.shape
    block = 1024
    _reduce_splits_kernel[(triton.cdiv(n, block), m)](
        part, out, xs if xs is not None else out, ws if ws is not None else out,
        bias if bias is not None else out, m, n, out.stride(0), splits,
        HAS_XS=xs is not None, HAS_WS=ws is not None, HAS_BIAS=bias is not None, BLOCK=block,
        num_warps=4,
    )
    return out


def _gated_out(n: int, tiles: GemvTiles, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``[1, n / 2]`` result of a gated GEMV over ``n`` weight rows, after checking that the
    tiling allows it (whole gate/up pairs per program, one split)."""
    if n % 2 or tiles.block_n < 2 or _k_per_split(x.shape[1], tiles) < x.shape[1]:
        raise ValueError(f"a gated GEMV needs an even row count ({n}), block_n >= 2 "
                         f"({tiles.block_n}) and one split ({tiles.split_k})")
    return torch.empty((1, n // 2), dtype=dtype, device=x.device)


def _one_row(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"one-token GEMV takes x [1, K], got {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def gemv16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
           tiles: GemvTiles | None = None, gated: bool = False, pdl: bool = False,
           rope: RopeStore | None = None) -> torch.Tensor:
    """``x @ w.T + bias`` for ``x`` ``[1, K]`` and a 16/32-bit ``w`` ``[N, K]`` (unit last stride):
    float32 sums, result in ``x.dtype``. ``gated``: ``w`` is ``[gate; up]`` and the result is
    ``silu_and_mul`` of that product, ``[1, N / 2]``, bit-for-bit the two ops (one split only).
    ``rope``: ``w`` is a layer's ``[q; k; v]``, rotated and stored in the epilogue as
    :func:`gemv_wna16`'s ``rope`` (returns the rotated q ``[1, Hq * D]``)."""
    tiles = tiles or GemvTiles()
    x = _one_row(x)
    n, k = w.shape
    if rope is not None:
        out = _rope_out(n, k, tiles, x, rope, "gemv16")
    elif gated:
        out = _gated_out(n, tiles, x, x.dtype)
    else:
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    args = (x, out, w, out, bias if bias is not None else out)  # no scales: out stands in
    return _launch(_gemv_dense_kernel, args, 1, n, k, out, None, None, bias, tiles, stride_xm=x.stride(0),
                   stride_wn=w.stride(0), stride_om=out.stride(0), HAS_XS=False, HAS_WS=False, BLOCK_M=1,
                   GATED=gated, pdl=pdl, **_rope_args(rope))


def linear16_tiles(k: int, gated: bool = False) -> GemvTiles:
    """The tiling of a one-token 16-bit GEMV over rows of ``k`` inputs. Measured on an H200
    (bf16 llama3-8b, 32 layers per chain; docs/QUANTIZATION.md, "One-token 16-bit GEMV"): a row
    of up to 4,096 inputs read whole by a program of 4 warps (one tile, no loop: all of its loads
    in flight at once) beat cuBLAS on qkv, o, gate_up and the LM head (13.4 / 9.7 / 53.8 / 233.7
    us against 15.6 / 13.3 / 56.7 / 251.3); ``gated`` (``[gate; up]`` with SiLU-and-mul) two such
    rows, a gate and its up row (54.0 us against 55.8 at the 8 x 1,024 tiles before); longer rows
    (down, 14,336) 8 rows x 2,048 x 8 warps (29.7 against 32.3)."""
    if k <= 4096:
        block_k = max(16, triton.next_power_of_2(k))
        return GemvTiles(block_n=2 if gated else 1, block_k=block_k, num_warps=4, split_k=1)
    return GemvTiles(block_n=8, block_k=2048, num_warps=8, split_k=1)


def gemv16_gated_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                        pdl: bool = False) -> torch.Tensor:
    """``silu_and_mul(x @ w.T + bias)`` for one token of ``x`` ``[..., K]`` and a 16/32-bit
    ``[gate; up]`` ``w`` (:func:`gemv16` with ``gated``, :func:`linear16_tiles`): ``[..., N / 2]``."""
    n, k = w.shape
    y = gemv16(x.reshape(-1, k), w, bias, tiles=linear16_tiles(k, gated=True), gated=True, pdl=pdl)
    return y.reshape(*x.shape[:-1], n // 2)


# One token, a layer's [q; k; v] 16-bit or fp8 weight: rotary + K/V store in the GEMV's epilogue
# (gemv16_rope_linear, fp8_matmul.fp8_weight_only_rope_linear; as the 4-bit word kernel's,
# wna16.M1_ROPE). False: those return None and the layer runs the GEMV, then rotary_store_kvcache.
DENSE_ROPE = True


def gemv16_rope_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, rope: RopeStore, *,
                       pdl: bool = False) -> torch.Tensor | None:
    """For one token of ``x`` and a layer's 16/32-bit ``[q; k; v]`` ``w``: :func:`gemv16` with
    rotary and the K/V store in its epilogue, returning the rotated q ``[1, Hq * D]``; None where
    that does not apply (``DENSE_ROPE`` off, more tokens, a cache or shape ``rope`` refuses). Its
    programs take a rotary pair of rows each (:func:`linear16_tiles`' gated tiling), where the
    plain one-token GEMV takes one row: the same products, summed in another order."""
    n, k = w.shape
    x2 = x.reshape(-1, k)
    tiles = linear16_tiles(k, gated=True)
    if not DENSE_ROPE or x2.shape[0] != 1 or not rope_fits(n, k, tiles, rope):
        return None
    return gemv16(x2, w, bias, tiles=tiles, pdl=pdl, rope=rope)


def gemv16_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                  tiles: GemvTiles | None = None, pdl: bool = False) -> torch.Tensor:
    """``x @ w.T + bias`` for one token of ``x`` ``[..., K]`` and a 16/32-bit ``w`` ``[N, K]``
    (:func:`gemv16` at ``tiles``, default :func:`linear16_tiles`): ``[..., N]``. Not cuBLAS's
    bits (its own order of sums)."""
    n, k = w.shape
    y = gemv16(x.reshape(-1, k), w, bias, tiles=tiles or linear16_tiles(k), pdl=pdl)
    return y.reshape(*x.shape[:-1], n)


def gemv_fp8(xq: torch.Tensor, xs: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, *,
             tiles: GemvTiles | None = None) -> torch.Tensor:
    """fp8 W8A8 for a few tokens: ``xq`` ``[M, K]`` e4m3 and ``xs`` ``[M, 1]`` from the per-token
    quantization (``M <= 16``: every program holds all tokens), ``w_fp8`` ``[N, K]`` e4m3 with
    ``w_scale`` ``[N]``; returns ``(sum_k xq wq) * xs[m] * ws[n] + bias[n]`` ``[M, N]``."""
    if xq.shape[0] > MAX_M:
        raise ValueError(f"gemv_fp8 takes at most {MAX_M} tokens, got {xq.shape[0]}")
    return _gemv_fp8_weights(xq, xs, w_fp8, w_scale, bias, out_dtype, tiles)


def gemv_fp8_weight_only(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, *, tiles: GemvTiles | None = None,
                         gated: bool = False, pdl: bool = False,
                         block: tuple[int, int] | None = None, rope: RopeStore | None = None) -> torch.Tensor:
    """fp8 weights on 16/32-bit activations (W8A16) for a few tokens: ``x`` ``[M, K]``
    (``M <= MAX_M``), ``w_fp8`` ``[N, K]`` e4m3 with ``w_scale`` ``[N]``; returns
    ``(sum_k x w_q) * w_scale[n] + bias[n]`` ``[M, N]`` in ``x.dtype`` (float32 sums). The
    activation is not quantized: no quantization launch before the product, and no activation
    rounding (:func:`kernels.quant_reference.fp8_weight_only_linear`). ``gated`` (one token):
    ``w_fp8`` is ``[gate; up]`` and the result ``silu_and_mul`` of the product, ``[1, N / 2]``.
    ``block`` ``(block_n, block_k)``: ``w_scale`` holds block-wise scales
    ``[ceil(N / block_n), ceil(K / block_k)]`` instead, each tile's sums scaled by its blocks'
    (:func:`kernels.quant_reference.fp8_block_weight_only_linear`). ``rope`` (one token,
    per-channel scales): ``w_fp8`` is a layer's ``[q; k; v]``, rotated and stored in the epilogue
    as :func:`gemv_wna16`'s ``rope`` (returns the rotated q ``[1, Hq * D]``)."""
    if x.dim() != 2 or x.shape[0] > MAX_M:
        raise ValueError(f"gemv_fp8_weight_only takes x [M <= {MAX_M}, K], got {tuple(x.shape)}")
    if (gated or rope is not None) and x.shape[0] != 1:
        raise ValueError(f"a gated or rope GEMV takes one token, got {x.shape[0]}")
    if rope is not None and block is not None:
        raise ValueError("gemv_fp8_weight_only: rope takes per-channel scales, not blocks")
    return _gemv_fp8_weights(x, None, w_fp8, w_scale, bias, x.dtype, tiles, gated, pdl, block, rope)


def _gemv_fp8_weights(x: torch.Tensor, xs: torch.Tensor | None, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype,
                      tiles: GemvTiles | None, gated: bool = False, pdl: bool = False,
                      block: tuple[int, int] | None = None, rope: RopeStore | None = None) -> torch.Tensor:
    """The dense GEMV over e4m3 weights for ``M <= MAX_M`` tokens: ``x`` quantized with per-token
    scales ``xs`` (W8A8), or 16/32-bit with ``xs`` None (W8A16); ``block``: W8A16 with block scales."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = w_fp8.shape[0]
    tiles = tiles or fp8_tiles(m, n, k)
    if rope is not None:
        out = _rope_out(n, k, tiles, x, rope, "gemv_fp8_weight_only")
    elif gated:
        out = _gated_out(n, tiles, x, out_dtype)
    else:
        out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    blocks: dict[str, Any] = {}
    if block is not None:
        bn, bk = block
        if xs is not None or bk < 16 or bk & (bk - 1):
            raise ValueError(f"block scales take 16/32-bit activations and a power-of-two block_k >= 16, "
                             f"got block {block}")
        if tuple(w_scale.shape) != (triton.cdiv(n, bn), triton.cdiv(k, bk)) or not w_scale.is_contiguous():
            raise ValueError(f"block scales of an [{n}, {k}] weight in blocks {block} are "
                             f"[{triton.cdiv(n, bn)}, {triton.cdiv(k, bk)}] contiguous, "
                             f"got {tuple(w_scale.shape)}")
        blocks = dict(SBN=bn, SBK=bk, SG=max(1, tiles.block_k // bk))
    # Absent scales and bias: w_scale stands in (never read).
    args = (x, xs if xs is not None else w_scale, w_fp8, w_scale, bias if bias is not None else w_scale)
    row_scales = None if block is not None else w_scale
    return _launch(_gemv_dense_kernel, args, m, n, k, out, xs, row_scales, bias, tiles, stride_xm=x.stride(0),
                   stride_wn=w_fp8.stride(0), stride_om=out.stride(0), HAS_XS=xs is not None,
                   HAS_WS=block is None, BLOCK_M=triton.next_power_of_2(m), GATED=gated,
                   PART=min(FP8_PART, tiles.block_k), pdl=pdl, **blocks,
                   **_rope_args(rope))


MAX_M = 16  # tokens gemv_fp8 takes (its register tile is [BLOCK_M, BLOCK_N, BLOCK_K])
# One token: fp8 products summed per thread in runs of one 16-byte load's weights (_dense_part).
FP8_PART = 16
# One token, with PART and PDL (H200, 32 llama3-8b layers, DECISIONS 137), by weight rows N and
# inputs K: N <= 4,096 (llama3-8b's o and down) 8 rows x 2,048 inputs on 8 warps; K <= 4,096
# (llama3-8b's qkv, gate_up) 4 x 2,048 on 2 warps up to 8,192 rows, 8 x 2,048 on 4 warps past
# it; else (llama3-70b, every projection: 97% of copy bandwidth, DECISIONS 133) 4 x 1,024 on 2.
FP8_M1_TILES = GemvTiles(block_n=4, block_k=1024, num_warps=2, split_k=1)
FP8_M1_FEW_ROWS_TILES = GemvTiles(block_n=8, block_k=2048, num_warps=8, split_k=1)
FP8_M1_FEW_ROWS = 4096
FP8_M1_SHORT_ROWS_TILES = GemvTiles(block_n=4, block_k=2048, num_warps=2, split_k=1)
FP8_M1_SHORT_MANY_ROWS_TILES = GemvTiles(block_n=8, block_k=2048, num_warps=4, split_k=1)
FP8_M1_SHORT_K = 4096
FP8_M1_MANY_ROWS = 8192


def fp8_tiles(m: int, n: int = 0, k: int = 0) -> GemvTiles:
    """The tiling of :func:`gemv_fp8` for ``m`` tokens of an ``[n, k]`` weight: at one token the
    measured ones (the constants above; ``n`` or ``k`` 0: unknown, ``FP8_M1_TILES``); above it
    the ``[BLOCK_M, BLOCK_N, BLOCK_K]`` product tile kept near 8k elements (registers)."""
    if m <= 1:
        if 0 < n <= FP8_M1_FEW_ROWS:
            return FP8_M1_FEW_ROWS_TILES
        if 0 < k <= FP8_M1_SHORT_K and n > 0:
            return FP8_M1_SHORT_ROWS_TILES if n <= FP8_M1_MANY_ROWS else FP8_M1_SHORT_MANY_ROWS_TILES
        return FP8_M1_TILES
    block_m = triton.next_power_of_2(m)
    block_n = 8 if block_m <= 4 else 4
    return GemvTiles(block_n=block_n, block_k=max(64, 8192 // (block_m * block_n)), num_warps=4, split_k=1)


def fit_block_k(block_k: int, group_size: int) -> int:
    """``block_k`` halved until it and ``group_size`` divide one another (>= 16: groups are
    multiples of 16): a tile then holds whole groups or part of one."""
    while group_size % block_k and block_k % group_size:
        block_k //= 2
    return block_k


def fit_tiles(tiles: GemvTiles, group_size: int) -> GemvTiles:
    """``tiles`` as :func:`gemv_wna16` launches them for groups of ``group_size``
    (:func:`fit_block_k`)."""
    return replace(tiles, block_k=fit_block_k(tiles.block_k, group_size))


def gemv_wna16(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
               bits: int, group_size: int, bias: torch.Tensor | None = None, *,
               tiles: GemvTiles | None = None, factored: bool = True, words: bool = True,
               gated: bool = False, nibble_asm: bool | None = None, pairs: bool = False,
               pdl: bool = False, peel: bool = False, xload: bool = False,
               counters: torch.Tensor | None = None, rope: RopeStore | None = None,
               dp4a: bool = False) -> torch.Tensor:
    """WnA16 at one token (:class:`kernels.quant_reference.WnA16Weight` layout; checked by
    :func:`kernels.triton_ops.wna16.wna16_linear`): ``x`` ``[1, K]``, float32 sums, result in
    ``x.dtype``. ``factored``: scales applied per group sum (module docstring). ``words``:
    4-bit weights whose rows can be read as int32 words go to :func:`_gemv_int4_words_kernel`
    (``factored`` is then implied: it scales each word's sum). ``gated``: the weight is
    ``[gate; up]`` and the result ``silu_and_mul`` of the product, ``[1, N / 2]``, bit-for-bit
    the two ops (fused in the word kernel; other layouts run the two ops). ``nibble_asm``: the
    word kernel decodes nibbles in inline PTX (:func:`nibbles_asm`; the same bits); None: on
    CUDA (the CPU interpreter cannot). ``pairs``: symmetric 4-bit words times bf16 inputs in
    packed bf16 arithmetic (:func:`pairs_asm`: fewer instructions, products and four-term sums
    rounded to bf16), where that applies (CUDA, bf16 ``x``, no offsets); else ignored. ``peel``:
    the word kernel takes its first tile before the loop, reading its words before the PDL wait
    (the same bits; ``wna16.M1_PEEL`` turns it on at one token, DECISIONS 137). ``xload``: the
    word kernel on whole tiles, bf16 or float16 ``x`` 16-byte aligned, on CUDA reads the inputs
    and the scales (and offsets) in inline PTX, in the words' layout (:func:`load_pairs_asm`,
    :func:`load_inputs_asm`, :func:`load_groups_asm`; the same bits); else ignored.
    ``counters`` (:func:`split_counters` for these tiles): with several splits, the word kernel's
    last program of each row block adds the splits' sums (:func:`_split_fixup`; the same bits)
    instead of a second launch; ignored by the other kernels and with one split. ``rope``
    (:class:`RopeStore`; the word kernel, one split, ``rope.applies``): the weight is a layer's
    ``[q; k; v]`` and the GEMV rotates q and k and stores k and v into the caches in its epilogue
    (:func:`_rope_epilogue`), returning the rotated q ``[1, Hq * D]``: bit for bit this GEMV then
    ``rotary_store_kvcache``, one launch. ``dp4a`` (with ``pairs`` and ``xload`` where they
    apply, tiles that give each thread two consecutive words, :func:`_dp4a_words`): the integer
    decode instead of the packed 16-bit one (:func:`~kernels.triton_ops.gemv_ptx.limbs_ptx`,
    :func:`~kernels.triton_ops.gemv_ptx.dp4a_ptx`)."""
    tiles = fit_tiles(tiles or GemvTiles(), group_size)
    x = _one_row(x)
    n = qweight.shape[0]
    k = x.shape[1]
    # 8-bit signed: the kernel adds 128 to the sign-extended value and subtracts it again as a float.
    signed8 = bits == 8 and qweight.dtype == torch.int8
    sub = 8.0 if (bits == 4 and offsets is None) else (128.0 if signed8 else 0.0)
    q_words = as_words(qweight) if (words and bits == 4) else None
    q = q_words if q_words is not None else qweight
    args = (x, q, scales, offsets if offsets is not None else scales, bias if bias is not None else scales)
    if gated and q_words is None:
        return silu_and_mul(gemv_wna16(x, qweight, scales, offsets, bits, group_size, bias, tiles=tiles,
                                       factored=factored, words=words, nibble_asm=nibble_asm, pdl=pdl))
    if rope is not None:
        if q_words is None or gated:
            raise ValueError("gemv_wna16: rope needs 4-bit rows of int32 words and no gating")
        out = _rope_out(n, k, tiles, x, rope, "gemv_wna16")
    elif gated:
        out = _gated_out(n, tiles, x, x.dtype)
    else:
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    if q_words is not None:
        use_pairs = pairs and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and sub == 8.0
        # Whole tiles: no masks (every split, too, is whole tiles when its length divides K).
        even = n % tiles.block_n == 0 and k % tiles.block_k == 0 and k % _k_per_split(k, tiles) == 0
        use_xload = (xload and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and even
                     and x.data_ptr() % 16 == 0)
        blocks = triton.cdiv(n, tiles.block_n)
        if counters is not None and (counters.dtype != torch.int32 or counters.numel() < blocks):
            raise ValueError(f"counters must be int32 with one count per row block ({blocks}; "
                             f"split_counters), got {counters.dtype} x {counters.numel()}")
        return _launch(_gemv_int4_words_kernel, args, 1, n, k, out, None, None, bias, tiles,
                       counters=counters, cnt_ptr=out,
                       stride_qn=q_words.stride(0), stride_sn=scales.stride(0), GROUP=group_size, SUB=sub,
                       HAS_OFFSET=offsets is not None, GATED=gated,
                       ASM=x.is_cuda if nibble_asm is None else nibble_asm,
                       PAIRS=use_pairs, EVEN=even, PEEL=peel, XLOAD=use_xload,
                       DP4A=_dp4a_words(tiles) if (dp4a and use_pairs and use_xload) else 0, pdl=pdl,
                       **_rope_args(rope))
    return _launch(_gemv_int_kernel, args, 1, n, k, out, None, None, bias, tiles,
                   stride_qn=qweight.stride(0), stride_sn=scales.stride(0), BITS=bits, GROUP=group_size,
                   SUB=sub, SIGNED8=signed8, HAS_OFFSET=offsets is not None, FACTORED=factored, pdl=pdl)


def _dp4a_words(tiles: GemvTiles) -> int:
    """Words per integer-decode step: 2 where each thread holds at least two consecutive words
    of a tile row (``block_k / 8`` words over ``32 num_warps`` threads), else 0 (the packed 16-bit
    decode: with one word per thread the conversion is shared by fewer rows and gains nothing, 225
    against 209 loop instructions at 8 x 2,048 on 8 warps, sm_90)."""
    return 2 if tiles.block_k // 8 >= 64 * tiles.num_warps else 0


def as_words(qweight: torch.Tensor) -> torch.Tensor | None:
    """Packed 4-bit rows ``[N, K / 2]`` (bytes) as int32 words ``[N, K / 8]`` without a copy, or
    None where the storage does not allow it (a row stride or offset that is not whole words)."""
    if qweight.element_size() != 1 or qweight.shape[1] % 4 or qweight.stride(1) != 1:
        return None
    if qweight.stride(0) % 4 or qweight.storage_offset() % 4 or qweight.data_ptr() % 4:
        return None
    return qweight.view(torch.int32)
