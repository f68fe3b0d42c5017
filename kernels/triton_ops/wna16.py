"""WnA16 linear: 4- or 8-bit grouped integer weights dequantized in registers, 16/32-bit
activations (GPTQ and GGUF weights after repacking, see :class:`kernels.quant_reference.WnA16Weight`).

Each weight tile is dequantized as ``q * scale[g] (+ offset[g])`` in float32, rounded to the
activation dtype (what :func:`kernels.quant_reference.wna16_linear` multiplies by), then:
- ``M == 1`` (batch-1 decode): :func:`kernels.triton_ops.gemv.gemv_wna16` (``GEMV_M1_TILES``),
  the exponent-trick conversion and per-group scaling (that module's docstring); symmetric
  weights times bf16 inputs on CUDA in packed bf16 arithmetic (``M1_PAIRS``), the first tile's
  words read before the PDL wait (``M1_PEEL``).
- ``2 <= M <= MMA_GEMV_MAX_M``, 4-bit weights in groups of multiples of 128 (symmetric, or
  asymmetric with offsets of the scales' dtype), bf16 or float16 inputs on CUDA: the
  tensor-core GEMV of :mod:`kernels.triton_ops.wna16_mma` (nibbles decoded in each lane's own
  ``mma`` fragment; exact products, float32 sums), eight tokens per launch.
- ``M <= WnA16Config.gemv_max_m`` otherwise (8-bit weights, smaller groups, float32 inputs):
  with ``WnA16Config.gemv_token_loop`` the one-token GEMV once per token, each
  launch reading the weight again; without it a GEMV over all the tokens: each program owns
  ``block_n`` output channels and every token (``M`` padded to a power of two), streams its
  rows of packed weight once along ``K`` (the layout's contiguous dim: 16-byte loads cover 32
  four-bit weights of one row), and multiplies on the CUDA cores with float32 sums (a grid of
  ``N / block_n`` programs: decode needs no split-K).
- larger ``M``: a tiled GEMM, ``tl.dot`` of an activation tile with the dequantized
  weight tile (float32 accumulation), grouped program order for L2 reuse of weight tiles.
Four-bit tiles are unpacked with ``tl.interleave(low, high)``: byte ``j`` holds inputs
``2j`` and ``2j + 1``. ``block_k`` and ``group_size`` divide one another (the host shrinks
``block_k`` until they do): a tile within one group loads one scale (and offset) per row,
a tile spanning ``block_k / group_size`` groups loads that many per row and applies them
through a ``[rows, groups, group_size]`` view of the tile (no per-element gathers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import triton
import triton.language as tl

from kernels.rope_store import RopeStore
from kernels.triton_ops.gemv import (
    GemvTiles,
    as_words,
    fit_block_k,
    fit_tiles,
    gemv_wna16,
    k_per_split,
    reduce_splits,
    rope_fits,
    split_counters,
)
from kernels.triton_ops.tiles import grouped_tile
from kernels.triton_ops.wna16_mma import MMA_MAX_M, gemv_int4_mma, mma_applies

# One token (batch-1 decode), gemv.gemv_wna16 (4-bit: its int32-word kernel): fastest on an
# H200 over the four llama3-8b projections in 4-bit groups of 128 among 19 tilings
# (docs/QUANTIZATION.md, "One-token GEMV").
GEMV_M1_TILES = GemvTiles(block_n=8, block_k=2048, num_warps=4, split_k=1)
# One token, per weight shape (N, K; a gated [gate; up] weight only takes an unsplit tiling of
# 2+ rows, m1_tiles): a tiling other than GEMV_M1_TILES, split-K ones added by their last
# program per row block (gemv.gemv_wna16 ``counters``: one set per layer,
# m1_counters; no second launch). The fastest of bench_gemv.py --parts w4_split on an H200
# (DECISIONS 141), us per llama3-8b layer with xload and PDL against GEMV_M1_TILES: qkv 5.93 vs
# 6.52, o 4.25 vs 4.71, down 11.16 vs 11.98; no split-K tiling won (fixup 7.50-10.25 on qkv).
# W2 W4A16 512.2 / 511.8 against 496.7 / 496.2 tok/s, alternating in one call. qkv since takes
# 16 rows (the integer decode, M1_DP4A, shares each thread's input conversion over its rows): on
# an H100 5.49 us per layer against 6.16 at 8 rows and 6.33 at 4 (the packed decode 6.56 at 4;
# DECISIONS 160).
M1_SHAPE_TILES: Mapping[tuple[int, int], GemvTiles] = MappingProxyType({
    (6144, 4096): GemvTiles(block_n=16, block_k=2048, num_warps=4, split_k=1),
    (4096, 4096): GemvTiles(block_n=8, block_k=2048, num_warps=8, split_k=1),
    (4096, 14336): GemvTiles(block_n=8, block_k=2048, num_warps=8, split_k=1),
})
# One token, symmetric 4-bit weights and bf16 inputs: gemv_wna16's packed bf16 decode (``pairs``):
# on an H200, llama3-8b's four projections 50.7 against 57.9 us per layer, W2 W4A16 413.8
# against 381.8 tok/s; max error / sum|x w| 3.7e-4 against 2.5e-4 (docs/DECISIONS.md 132).
M1_PAIRS = True
# The same for float16 inputs (gemv_ptx.pairs_ptx("fp16"): one shift per word instead of three,
# products and sums of a sixteenth in float16): on an H200 with xload 6.62 / 5.14 / 20.09 / 12.26
# us per llama3-8b projection, error / max |ref| 4.8e-4 to 8.9e-4 (DECISIONS 139).
M1_PAIRS_F16 = True
# One token: gemv_wna16's first tile taken before its loop, its words read before the PDL wait:
# on an H200 32 llama3-8b layers 53.4-53.8 against 56.1-56.3 us per layer, W2 W4A16 449.8-450.1
# against 441.9-442.2 tok/s, the same bits (DECISIONS 137).
M1_PEEL = True
# One token, 16-bit inputs on whole tiles: the word GEMV's inputs and scales read in inline PTX
# in the word tile's layout (gemv.gemv_wna16 ``xload``; the same bits): on an H200 32 llama3-8b
# layers 47.1-47.9 against 53.8-54.6 us per layer, W2 W4A16 498.8 against 450.0 tok/s (DECISIONS 139).
M1_XLOAD = True
# One token, symmetric 4-bit weights and bf16 inputs: the integer decode (gemv_ptx.limbs_ptx and
# gemv_ptx.dp4a_ptx: each thread's two words of inputs as 16-bit fixed point, dp4a on the nibbles in
# place) instead of the packed bf16 one, where the tiling gives each thread two words of a row.
# On an H100 (DECISIONS 160): gate_up 21.43 against 23.71 us per layer, qkv at 16 x 2,048 on 4
# warps 5.49 against 6.56 (o and down keep one word per thread: the packed decode), W2 W4A16
# 492.0 / 492.2 against 474.3 / 474.6 tok/s (bf16 194.7-194.8).
M1_DP4A = True
# The same for float16 inputs (gemv_ptx.limbs_ptx(act="fp16")), against their packed float16 decode
# (M1_PAIRS_F16) on an H100: gate_up 21.01 against 23.02 us per layer, qkv at 16 rows 5.51
# against 6.33 at 4 (DECISIONS 160). M1_SHAPE_TILES' qkv entry (16 rows) is the integer decode's.
M1_DP4A_F16 = True
# One token, the other decodes' own tilings where they differ from M1_SHAPE_TILES' (which are the
# integer decode's): m1_tiles(dp4a=False), taken where the integer decode does not run (its flag
# off for the inputs' dtype, the packed decode it needs off, inputs not 16-bit, or asymmetric
# weights). qkv at 4 rows: the packed decodes 6.54 against 8.14 us per layer at 16 in bf16, 6.33
# against 7.55 in float16, on an H100 (DECISIONS 160-161).
M1_PACKED_TILES: Mapping[tuple[int, int], GemvTiles] = MappingProxyType({
    (6144, 4096): GemvTiles(block_n=4, block_k=2048, num_warps=4, split_k=1),
})
# One token, a layer's [q; k; v] weight: rotary + K/V store in the GEMV's epilogue
# (wna16_rope_linear; gemv.gemv_wna16 ``rope``), one launch fewer per layer in the decode chain.
# False: wna16_rope_linear returns None and the layer runs the GEMV, then rotary_store_kvcache.
M1_ROPE = True
# From two tokens up to this many, symmetric 4-bit weights times bf16 inputs on CUDA take the
# tensor-core GEMV (wna16_mma), eight tokens per launch; float16 inputs too, in the same
# program with float16 types (DECISIONS 138: not timed on a card); asymmetric 4-bit weights too
# (offsets: one more mma per input pair, DECISIONS 139). On an H200 over llama3-8b's four
# projections (us per layer): 2 tokens 71 against 407 for this module's CUDA-core GEMV, 8: 79
# against 2,020, 16: 150 against 3,999 (and 1,084 for the GEMM). At one token the word kernel
# is faster (53.4 against 68.7; why is not profiled yet: DECISIONS 137). 0: never.
MMA_GEMV_MAX_M = 16
# Where the tensor-core GEMV does not apply, the one-token GEMV once per token up to this many
# tokens (WnA16Config.gemv_token_loop), the GEMM above. On an H200 over llama3-8b's four
# projections (us per layer): asymmetric 4-bit per token 132.9 / 257.5 / 503.8 / 991.1 at 2 / 4 /
# 8 / 16 tokens against 760 for the GEMM; 8-bit 206.1 / 403.4 against 375 (DECISIONS 139).
TOKEN_LOOP_MAX_M_4BIT = 11
TOKEN_LOOP_MAX_M_8BIT = 3
# The GEMM's split-K (gemm_splits): the shortest K range, in tiles.
GEMM_MIN_SPLIT_TILES = 4
# This module's GEMV at one token (block_n, block_k, warps), kept for one_token_gemv=False.
FUSED_M1_TILES = (4, 1024, 2)


@dataclass(frozen=True)
class WnA16Config:
    """Dispatch and tiling of :func:`wna16_linear` (``None``: chosen from the shapes)."""

    gemv_max_m: int = 16
    one_token_gemv: bool = True  # M == 1: gemv.gemv_wna16 (module docstring)
    # 2 <= M <= gemv_max_m where the tensor-core GEMV does not apply: gemv.gemv_wna16 once per
    # token up to TOKEN_LOOP_MAX_M_4BIT / _8BIT tokens, the GEMM above (module docstring), rather than
    # this module's multi-token GEMV, which a card measured never faster (DECISIONS 139).
    gemv_token_loop: bool = True
    gemv_block_n: int | None = None
    gemv_block_k: int | None = None
    gemv_num_warps: int | None = None
    # GEMM tiles; None: gemm_tiles(M) (measured on an H200, DECISIONS 139).
    gemm_block_m: int | None = None
    gemm_block_n: int | None = None
    gemm_block_k: int | None = None
    gemm_num_warps: int | None = None
    gemm_num_stages: int = 3
    # Split-K of the GEMM: gemm_split_k ranges of K, or (None) gemm_splits aiming at
    # gemm_programs_per_sm programs per SM (0: no split). On an H200 over llama3-8b's four
    # projections (us per layer, bench_gemv.py --parts w4gemm): 16 tokens 719.6 unsplit against
    # 190.7 split with gemm_tiles' tiling, 64 tokens 1,037.4 against 237.3, 256: 1,517.7 against
    # 581.4 (DECISIONS 139).
    gemm_split_k: int | None = None
    gemm_programs_per_sm: int = 2

    def __post_init__(self) -> None:
        for name in ("gemv_block_n", "gemv_block_k", "gemm_block_m", "gemm_block_n", "gemm_block_k"):
            v = getattr(self, name)
            if v is not None and (v & (v - 1) or v < 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if any(v is not None and v < 16 for v in (self.gemm_block_k, self.gemv_block_k)):
            raise ValueError("block_k must be >= 16")
        if (self.gemm_split_k is not None and self.gemm_split_k < 1) or self.gemm_programs_per_sm < 0:
            raise ValueError(f"gemm_split_k must be >= 1 and gemm_programs_per_sm >= 0, "
                             f"got {self.gemm_split_k} and {self.gemm_programs_per_sm}")


_DEFAULT = WnA16Config()


@triton.jit
def _dequant_tile(
    q_rows, s_rows, o_rows, k0, K, n_ok,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
):
    """float32 ``[rows, BLOCK_K]`` weights of inputs ``k0 .. k0 + BLOCK_K`` (``*_rows``: ``[rows, 1]``
    pointers to each row's packed weight, scales and offsets). ``SCALE_PER_TILE``: ``GROUP`` is
    a multiple of ``BLOCK_K``; else ``BLOCK_K`` is a multiple of ``GROUP``."""
    kk = k0 + tl.arange(0, BLOCK_K)
    if BITS == 4:
        jj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(q_rows + jj[None, :], mask=n_ok[:, None] & (2 * jj < K)[None, :], other=0)
        q = tl.interleave(b & 0xF, b >> 4).to(tl.float32)
        if not HAS_OFFSET:
            q = q - 8.0
    else:
        q = tl.load(q_rows + kk[None, :], mask=n_ok[:, None] & (kk < K)[None, :], other=0).to(tl.float32)
    if SCALE_PER_TILE:
        g = k0 // GROUP
        w = q * tl.load(s_rows + g, mask=n_ok[:, None], other=0.0).to(tl.float32)
        if HAS_OFFSET:
            w += tl.load(o_rows + g, mask=n_ok[:, None], other=0.0).to(tl.float32)
    else:
        gg = tl.arange(0, BLOCK_K // GROUP)
        g = (k0 // GROUP + gg)[None, :]
        ok = n_ok[:, None] & (k0 + gg * GROUP < K)[None, :]
        s = tl.load(s_rows + g, mask=ok, other=0.0).to(tl.float32)
        w3 = tl.reshape(q, [q.shape[0], BLOCK_K // GROUP, GROUP]) * s[:, :, None]
        if HAS_OFFSET:
            w3 += tl.load(o_rows + g, mask=ok, other=0.0).to(tl.float32)[:, :, None]
        w = tl.reshape(w3, [q.shape[0], BLOCK_K])
    return w


@triton.jit
def _wna16_gemv_kernel(
    x_ptr, q_ptr, s_ptr, o_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_om,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    kk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    rn64 = rn.to(tl.int64)[:, None]
    q_rows = q_ptr + rn64 * stride_qn
    s_rows = s_ptr + rn64 * stride_sn
    o_rows = o_ptr + rn64 * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _dequant_tile(q_rows, s_rows, o_rows, k0, K, n_ok,
                          BITS, GROUP, BLOCK_K, HAS_OFFSET, SCALE_PER_TILE)
        w = w.to(x_ptr.dtype.element_ty).to(tl.float32)  # the 16-bit weight the reference multiplies by
        x = tl.load(x_rows + (k0 + kk)[None, :], mask=m_ok[:, None] & (k0 + kk < K)[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _wna16_gemm_kernel(
    x_ptr, q_ptr, s_ptr, o_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_om,
    part_ptr, K_PER_SPLIT,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    SPLIT: tl.constexpr = False,
):
    # SPLIT: program axis 1 is a range of K_PER_SPLIT inputs (a multiple of BLOCK_K); its float32
    # sums go to part_ptr [splits, M, N], added in split order by gemv.reduce_splits (with the bias).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    kk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    rn64 = rn.to(tl.int64)[:, None]
    q_rows = q_ptr + rn64 * stride_qn
    s_rows = s_ptr + rn64 * stride_sn
    o_rows = o_ptr + rn64 * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x = tl.load(x_rows + (k0 + kk)[None, :], mask=m_ok[:, None] & (k0 + kk < k_hi)[None, :], other=0.0)
        w = _dequant_tile(q_rows, s_rows, o_rows, k0, k_hi, n_ok,
                          BITS, GROUP, BLOCK_K, HAS_OFFSET, SCALE_PER_TILE)
        w = w.to(x.dtype)
        if IEEE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if SPLIT:
        part = part_ptr + (pid_k * M + rm).to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(part, acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _check(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
           bits: int, group_size: int) -> None:
    k = x2.shape[1]
    if bits not in (4, 8) or qweight.shape[1] * (2 if bits == 4 else 1) != k:
        raise ValueError(f"wna16_linear: qweight {tuple(qweight.shape)} is not {bits}-bit rows of K={k}")
    if group_size % 16 or k % group_size or scales.shape != (qweight.shape[0], k // group_size):
        raise ValueError(f"wna16_linear: scales {tuple(scales.shape)} do not match group_size {group_size}")
    if offsets is not None and (offsets.shape != scales.shape or not _same_strides(offsets, scales)):
        raise ValueError("wna16_linear: offsets must have the scales' shape and strides")
    if qweight.stride(-1) != 1 or (scales.stride(-1) != 1 and scales.shape[-1] > 1):
        raise ValueError("wna16_linear: qweight and scales need a unit last stride")


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides where they matter (a dimension of size 1 is never stepped along: one group
    per row gives scales ``[N, 1]`` whatever stride that dimension carries)."""
    return all(sa == sb for sa, sb, size in zip(a.stride(), b.stride(), a.shape, strict=True) if size > 1)


def _m1_pairs(x: torch.Tensor) -> bool:
    """Whether the one-token GEMV takes the packed 16-bit decode for inputs like ``x``."""
    return M1_PAIRS if x.dtype != torch.float16 else M1_PAIRS_F16


def m1_tiles(n: int, k: int, gated: bool = False, dp4a: bool = True) -> GemvTiles:
    """The one-token GEMV's tiling of an ``[n, k]`` weight: with ``dp4a`` False (the packed
    decodes) ``M1_PACKED_TILES``' entry first, then ``M1_SHAPE_TILES``' entry, else
    ``GEMV_M1_TILES``. A gated GEMV takes one split and whole gate/up pairs: an entry that is not
    such a tiling gives it ``GEMV_M1_TILES``."""
    packed = None if dp4a else M1_PACKED_TILES.get((n, k))
    tiles = packed or M1_SHAPE_TILES.get((n, k), GEMV_M1_TILES)
    if gated and (tiles.split_k != 1 or tiles.block_n < 2):
        return GEMV_M1_TILES
    return tiles


def m1_counters(n: int, k: int, device: torch.device) -> torch.Tensor | None:
    """The split-K arrival counts of the one-token GEMV of an ``[n, k]`` weight on ``device``
    (:func:`~kernels.triton_ops.gemv.split_counters`), or None where its tilings (the integer
    decode's and the packed decodes') have one split; with several splits, as many counts as the
    tiling of smaller row blocks needs (a launch uses the first of them). A layer allocates them
    once and passes them as ``counters``; they are 0 between launches."""
    split = [t for t in (m1_tiles(n, k), m1_tiles(n, k, dp4a=False)) if t.split_k > 1]
    if not split:
        return None
    return split_counters(n, min(split, key=lambda t: t.block_n), device)


def _m1_launch(x: torch.Tensor, n: int, offsets: torch.Tensor | None,
               gated: bool = False) -> tuple[GemvTiles, bool]:
    """The one-token GEMV's tiling of an ``[n, K]`` weight for inputs like ``x`` and weights with
    ``offsets``, and whether it takes the integer decode: as ``gemv_wna16`` takes it, for 16-bit
    inputs and symmetric weights where the packed decode is on (``pairs``) and the dtype's flag
    too. The launch (:func:`one_token_gemv`) and the rotary check before it
    (:func:`wna16_rope_linear`) both ask here, so they cannot disagree."""
    dp4a = (x.dtype in (torch.bfloat16, torch.float16) and offsets is None and _m1_pairs(x)
            and (M1_DP4A_F16 if x.dtype == torch.float16 else M1_DP4A))
    return m1_tiles(n, x.shape[-1], gated, dp4a), dp4a


def one_token_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   offsets: torch.Tensor | None, bits: int, group_size: int,
                   bias: torch.Tensor | None, *, pdl: bool, gated: bool = False,
                   counters: torch.Tensor | None = None, rope: RopeStore | None = None) -> torch.Tensor:
    """:func:`~kernels.triton_ops.gemv.gemv_wna16` on one token ``x`` ``[1, K]`` with this module's
    one-token settings (:func:`m1_tiles`, ``M1_PAIRS`` / ``M1_PAIRS_F16``, ``M1_PEEL``,
    ``M1_XLOAD``): the single place the engine's one-token launches take them
    from. ``counters`` (:func:`m1_counters`): a split tiling's sums added in the GEMV; None: by a
    second launch. ``rope``: a ``[q; k; v]`` weight rotated and stored in the epilogue (returns
    the rotated q; ``gemv_wna16``'s ``rope``)."""
    tiles, dp4a = _m1_launch(x, qweight.shape[0], offsets, gated)
    return gemv_wna16(x, qweight, scales, offsets, bits, group_size, bias, tiles=tiles,
                      gated=gated, pairs=_m1_pairs(x), pdl=pdl, peel=M1_PEEL, xload=M1_XLOAD,
                      counters=counters, rope=rope, dp4a=dp4a)


def mma_tokens(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
               bias: torch.Tensor | None, pdl: bool = False,
               offsets: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`~kernels.triton_ops.wna16_mma.gemv_int4_mma` over ``x`` ``[M, K]`` (contiguous) in
    launches of ``MMA_MAX_M`` tokens (each reads the weight once): ``[M, N]``."""
    if x.shape[0] <= MMA_MAX_M:
        return gemv_int4_mma(x, qweight, scales, group_size, bias, pdl=pdl, offsets=offsets)
    return torch.cat([gemv_int4_mma(x[i:i + MMA_MAX_M], qweight, scales, group_size, bias, pdl=pdl,
                                    offsets=offsets)
                      for i in range(0, x.shape[0], MMA_MAX_M)])


def wna16_gated_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       offsets: torch.Tensor | None, bits: int, group_size: int,
                       bias: torch.Tensor | None = None, *, pdl: bool = False) -> torch.Tensor:
    """``silu_and_mul(wna16_linear(x, ...))`` for one token of ``x`` ``[..., K]`` and a
    ``[gate; up]`` weight: the activation in the one-token GEMV's epilogue, bit-for-bit the two
    ops (:func:`kernels.triton_ops.gemv.gemv_wna16` with ``gated``). Returns ``[..., N / 2]``."""
    n = qweight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    _check(x2, qweight, scales, offsets, bits, group_size)
    y = one_token_gemv(x2, qweight, scales, offsets, bits, group_size, bias, pdl=pdl, gated=True)
    return y.reshape(*x.shape[:-1], n // 2)


def wna16_rope_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                      offsets: torch.Tensor | None, bits: int, group_size: int, bias: torch.Tensor | None,
                      rope: RopeStore, *, pdl: bool = False) -> torch.Tensor | None:
    """For one token of ``x`` and a layer's ``[q; k; v]`` 4-bit weight: the one-token GEMV with
    rotary and the K/V store in its epilogue (``gemv_wna16``'s ``rope``), returning the rotated q
    ``[1, Hq * D]``, bit for bit ``wna16_linear`` then ``rotary_store_kvcache``; None where that
    kernel does not apply (more tokens, 8-bit weights, rows that are not int32 words, a tiling
    of ``M1_SHAPE_TILES`` with several splits or one row, a cache or shape ``rope`` refuses): the
    caller then runs the two ops."""
    n, k = qweight.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)
    tiles = fit_tiles(_m1_launch(x2, n, offsets)[0], group_size)  # what gemv_wna16 launches
    if (not M1_ROPE or x2.shape[0] != 1 or bits != 4 or as_words(qweight) is None
            or not rope_fits(n, k, tiles, rope)):
        return None
    _check(x2, qweight, scales, offsets, bits, group_size)
    return one_token_gemv(x2, qweight, scales, offsets, bits, group_size, bias, pdl=pdl, rope=rope)


def wna16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    config: WnA16Config | None = None,
    pdl: bool = False,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton :func:`kernels.quant_reference.wna16_linear` (arguments as there; ``config`` sets
    the GEMV/GEMM threshold and tilings; ``pdl``: the one-token GEMV launches with
    :mod:`~kernels.triton_ops.pdl`; ``counters``: the layer's :func:`m1_counters`, for the
    one-token GEMV). Returns ``[..., N]`` in ``x.dtype``."""
    config = config or _DEFAULT
    n = qweight.shape[0]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    _check(x2, qweight, scales, offsets, bits, group_size)
    m = x2.shape[0]
    if m == 1 and config.one_token_gemv and config.gemv_max_m >= 1:
        y = one_token_gemv(x2, qweight, scales, offsets, bits, group_size, bias, pdl=pdl, counters=counters)
        return y.reshape(*x.shape[:-1], n)
    mma = 2 <= m <= min(MMA_GEMV_MAX_M, config.gemv_max_m)
    if mma and mma_applies(x2[:MMA_MAX_M], qweight, offsets, bits, group_size, scales):
        return mma_tokens(x2, qweight, scales, group_size, bias, pdl, offsets).reshape(*x.shape[:-1], n)
    loop_max = TOKEN_LOOP_MAX_M_4BIT if bits == 4 else TOKEN_LOOP_MAX_M_8BIT
    if 2 <= m <= min(config.gemv_max_m, loop_max) and config.gemv_token_loop and config.one_token_gemv:
        # One launch after another on the same counts: each launch's programs reach the count
        # only after the launch before has finished (stream order; with PDL, after its wait).
        y = torch.cat([one_token_gemv(x2[i:i + 1], qweight, scales, offsets, bits, group_size, bias, pdl=pdl,
                                      counters=counters)
                       for i in range(m)])
        return y.reshape(*x.shape[:-1], n)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    common: dict[str, int | bool] = dict(
        BITS=bits, GROUP=group_size, HAS_OFFSET=offsets is not None, HAS_BIAS=bias is not None,
    )
    args = (
        x2, qweight, scales,
        offsets if offsets is not None else scales, bias if bias is not None else scales, out,
        m, n, k, x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
    )
    if m <= config.gemv_max_m and not (config.gemv_token_loop and config.one_token_gemv and m > 1):
        block_m = min(triton.next_power_of_2(m), 16)
        if block_m == 1:  # batch-1 decode: the tiling measured fastest (FUSED_M1_TILES)
            block_n, block_k, warps = FUSED_M1_TILES
        else:
            block_n, warps = (16 if block_m <= 2 else 8), 4
            block_k = max(32, min(512, 8192 // (block_m * block_n)))
        block_n = config.gemv_block_n or block_n
        block_k = fit_block_k(config.gemv_block_k or block_k, group_size)
        _wna16_gemv_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m))](
            *args, **common, SCALE_PER_TILE=group_size % block_k == 0,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=config.gemv_num_warps or warps,
        )
    else:
        tm, tn, tk, tw = gemm_tiles(m)
        block_m = config.gemm_block_m or tm
        block_n, block_k = config.gemm_block_n or tn, fit_block_k(config.gemm_block_k or tk, group_size)
        warps = config.gemm_num_warps or tw
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        splits = config.gemm_split_k or gemm_splits(tiles, k, block_k, x.device, config.gemm_programs_per_sm)
        per_split = k_per_split(k, splits, block_k)
        splits = triton.cdiv(k, per_split)
        part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
        _wna16_gemm_kernel[(tiles, splits)](
            *args, part, per_split, **common, SCALE_PER_TILE=group_size % block_k == 0,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
            IEEE_DOT=x.dtype == torch.float32, SPLIT=splits > 1,
            num_warps=warps, num_stages=config.gemm_num_stages,
        )
        if splits > 1:
            reduce_splits(part, out, bias)
    return out.reshape(*x.shape[:-1], n)


def gemm_tiles(m: int) -> tuple[int, int, int, int]:
    """The GEMM's (block_m, block_n, block_k, warps) at ``m`` tokens, with split-K: the fastest
    of six tilings at 16, 64 and 256 tokens on an H200 (llama3-8b projections, groups of 128;
    ``bench_gemv.py --parts w4gemm``, DECISIONS 139)."""
    if m <= 16:
        return 16, 128, 128, 4
    if m <= 64:
        return 64, 128, 128, 8
    return 128, 64, 64, 4


def gemm_splits(tiles: int, k: int, block_k: int, device: torch.device, programs_per_sm: int) -> int:
    """How many ``K`` ranges the W4A16 GEMM splits into when ``tiles`` output tiles would leave the
    card's SMs idle (decode batches: 17-64 tokens give 32-224 tiles on llama3-8b, against 132
    SMs on an H200): enough for ``programs_per_sm`` programs per SM, each at least
    ``GEMM_MIN_SPLIT_TILES`` tiles of ``block_k`` inputs long. 1 off CUDA or with
    ``programs_per_sm`` 0."""
    if device.type != "cuda" or programs_per_sm == 0:
        return 1
    want = programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(want, tiles), k // (GEMM_MIN_SPLIT_TILES * block_k)))
