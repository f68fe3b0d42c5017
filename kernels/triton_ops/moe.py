"""Mixture of experts, the Triton version of :func:`kernels.reference.fused_moe`.

A layer's experts are stacked: ``w13`` ``[E, 2I, H]`` (expert ``e``'s gate rows ``0..I-1``, then
its up rows ``I..2I-1``) and ``w2`` ``[E, H, I]``; each token ``t`` names its top-k experts in
``topk_ids`` ``[T, K]`` with float32 routing weights ``topk_weights`` ``[T, K]``. The op works on
the ``T * K`` (token, k) *pairs*, pair ``p = t * K + k``, in three steps (the design of vLLM's
fused MoE):

1. :func:`moe_align` groups the pairs by expert (a stable sort of the expert ids) and pads each
   expert's group to a multiple of ``BLOCK_M`` with the sentinel ``T * K``, so that every block
   of ``BLOCK_M`` sorted pairs belongs to one expert (``block_expert``). It runs in torch ops on
   the device with no host synchronization (no ``.item()``, no data-dependent shape): its outputs
   have a static length, the bound :func:`moe_padded_len`, and blocks past the used ones carry
   the expert ``E``, which the kernels skip. So a decode step can be captured in a CUDA graph.
2. ``_moe_gate_up_kernel``, one program per (block of sorted pairs, block of ``BLOCK_N``
   intermediate columns): gathers the pairs' token rows of ``x``, multiplies them by the gate
   rows and the up rows of the block's expert (two ``tl.dot`` over ``H`` in ``BLOCK_K`` steps,
   float32 accumulators) and writes ``silu(gate) * up`` in ``x``'s dtype to an intermediate
   buffer ``[T * K, I]`` at row ``p``. Each expert's weights are read once per block of pairs,
   not once per token.
3. ``_moe_down_kernel``, one program per (block of sorted pairs, block of ``BLOCK_N`` outputs):
   the intermediate rows times ``w2[e]^T`` over ``I``, times the pair's routing weight, stored in
   float32 to ``[T * K, H]`` at row ``p``; the wrapper then sums the ``K`` rows of each token in
   float32 and rounds once to ``x``'s dtype. Keeping this buffer in float32 (not ``x``'s dtype)
   costs ``4 * T * K * H`` bytes and saves one rounding per pair: a 16-bit output is rounded once,
   from the float32 sum, where the reference rounds each expert's term and each partial sum.

Every pair sits in exactly one block, and every (block, column block) program writes its pairs'
columns, so both buffers are fully written (``torch.empty``) and the sum is deterministic (no
atomics). ``H`` and ``I`` need not be multiples of the blocks (masked tails); offsets that
scale with the expert, the token or the pair are computed in int64.

16-bit inputs stay 16-bit in the products (tensor cores); float32 inputs use IEEE float32
products (no TF32), so a float32 model agrees with the reference to float32 rounding. Under
Triton's CPU interpreter bf16 operands are widened to float32 first (exact): its ``tl.dot``
multiplies bf16 as raw integers.

FP8 experts (W8A16, ``W_FP8``, a constexpr: 16/32-bit experts compile to the code they had
before): ``w13`` and ``w2`` are ``float8_e4m3fn`` with one float32 scale per row, ``w13_scale``
``[E, 2I]`` and ``w2_scale`` ``[E, H]``; the activation stays in ``x``'s dtype. The kernels load
the e4m3 weight tiles (half the bytes of bf16) and convert them to ``x``'s dtype before the
``tl.dot`` (exact: every e4m3 value is a bf16/fp16/fp32 value), so the products and the float32
sums are those of 16/32-bit weights holding the codes. Kernel 1 then multiplies the gate
accumulator by the gate rows' scales and the up accumulator by the up rows' scales before the
SiLU-and-mul; kernel 2 multiplies its accumulator by ``w2``'s row scales before the routing
weight. A row scale factors out of its dot product, so this is :func:`kernels.reference.fused_moe`'s
fp8 path but for the order of the float32 sums. Under the interpreter (``fp8_common.software_fp8``)
the codes are decoded in integer ops (:func:`e4m3_to_float32_software`): the interpreter's own
e4m3 conversion is right for every finite code but turns the NaN codes ``0x7F``/``0xFF`` into
+-480 (a NaN weight would give finite output). On a GPU the conversion is the hardware one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.quant_reference import FP8_DTYPE
from kernels.triton_ops.fp8_common import software_fp8

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NUM_WARPS = 4
# Default BLOCK_N (columns of the intermediate or the output per program) and the BLOCK_K of the
# products: 64 for 16-bit inputs, 32 for float32 (the same bytes a tile); both at most the
# dimension rounded up to a power of two, and at least 16 (tl.dot's minimum).
_BLOCK_N = 64
_BLOCK_K_16BIT = 64
_BLOCK_K_FP32 = 32


@triton.jit
def _dot(a, b, acc, F32_DOT: tl.constexpr):
    """``acc + a @ b``: in IEEE float32 with ``F32_DOT`` (operands widened, exact for 16-bit
    ones), else on the operands' own type (16-bit tensor cores) with float32 accumulation."""
    if F32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def e4m3_to_float32_software(w):
    """The float32 value of e4m3 ``w`` in integer ops, exact for every code (``0x7F``/``0xFF``
    NaN): Triton's interpreter decodes those two codes as +-480."""
    b = w.to(tl.uint8, bitcast=True).to(tl.int32)
    a = b & 0x7F
    # Normal (a >= 8): float32 exponent (a >> 3) - 7 + 127, the 3 mantissa bits on top of 23.
    normal = ((a << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    subnormal = a.to(tl.float32) * 0.001953125  # a * 2^-9, exact
    value = tl.where(a >= 8, normal, subnormal)
    value = tl.where(a == 0x7F, float("nan"), value)
    # The sign as a bit (0x80 is -0.0; a float negation would give +0.0).
    bits = value.to(tl.int32, bitcast=True) | ((b & 0x80) << 24)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e4m3_to(w, dtype: tl.constexpr, SOFT_FP8: tl.constexpr):
    """e4m3 ``w`` as ``dtype`` (bf16, fp16 or fp32 hold every e4m3 value exactly): the hardware
    conversion, or with ``SOFT_FP8`` (the interpreter) :func:`e4m3_to_float32_software`."""
    if SOFT_FP8:
        return e4m3_to_float32_software(w).to(dtype)
    return w.to(dtype)


@triton.jit
def _moe_gate_up_kernel(x_ptr, w13_ptr, w13_scale_ptr, sorted_ids_ptr, block_expert_ptr, h_ptr,
                        num_pairs, num_experts, HIDDEN, INTER, TOP_K,
                        stride_xt, stride_xh, stride_we, stride_wn, stride_wh, stride_se, stride_sn,
                        stride_hp,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        F32_DOT: tl.constexpr, W_FP8: tl.constexpr, SOFT_FP8: tl.constexpr):
    # Program (block of sorted pairs, block of intermediate columns n):
    # h[p, n] = silu(x[p // K] . w13[e, n]) * (x[p // K] . w13[e, INTER + n]), e the block's expert.
    # W_FP8: w13 e4m3, each dot product times its row's scale w13_scale[e, n] (not read otherwise).
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= num_experts:  # a block past the used ones (moe_align's static length): no pairs
        return
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pair_ok = pair < num_pairs  # the padding sentinel is num_pairs
    token = pair // TOP_K
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < INTER
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + token[:, None] * stride_xt
    # [BLOCK_K, BLOCK_N] tiles of w13[e]^T: gate rows n, up rows INTER + n.
    n64 = n.to(tl.int64)
    gate_cols = w13_ptr + e * stride_we + n64[None, :] * stride_wn
    up_cols = w13_ptr + e * stride_we + (n64 + INTER)[None, :] * stride_wn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        k = k0 + ks
        k_ok = k < HIDDEN
        xt = tl.load(x_rows + k[None, :] * stride_xh, mask=pair_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        w_gate = tl.load(gate_cols + k[:, None] * stride_wh, mask=w_mask, other=0.0)
        w_up = tl.load(up_cols + k[:, None] * stride_wh, mask=w_mask, other=0.0)
        if W_FP8:  # the codes as x's dtype, exact
            w_gate = e4m3_to(w_gate, x_ptr.dtype.element_ty, SOFT_FP8)
            w_up = e4m3_to(w_up, x_ptr.dtype.element_ty, SOFT_FP8)
        acc_gate = _dot(xt, w_gate, acc_gate, F32_DOT)
        acc_up = _dot(xt, w_up, acc_up, F32_DOT)
    if W_FP8:
        scale_rows = w13_scale_ptr + e * stride_se
        acc_gate = acc_gate * tl.load(scale_rows + n64 * stride_sn, mask=n_ok, other=0.0)[None, :]
        acc_up = acc_up * tl.load(scale_rows + (n64 + INTER) * stride_sn, mask=n_ok, other=0.0)[None, :]
    # silu(g) = g / (1 + exp(-g)); for g very negative exp(-g) is inf and the quotient -0.0.
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    h_ptrs = h_ptr + pair[:, None] * stride_hp + n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=pair_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_down_kernel(h_ptr, w2_ptr, w2_scale_ptr, topk_weights_ptr, sorted_ids_ptr, block_expert_ptr,
                     out_ptr, num_pairs, num_experts, HIDDEN, INTER,
                     stride_hp, stride_we, stride_wh, stride_wi, stride_se, stride_sn, stride_op,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     F32_DOT: tl.constexpr, W_FP8: tl.constexpr, SOFT_FP8: tl.constexpr):
    # Program (block of sorted pairs, block of outputs n):
    # out[p, n] = topk_weights[p] * (h[p] . w2[e, n]) in float32, e the block's expert.
    # W_FP8: w2 e4m3, (h[p] . w2[e, n]) times the row's scale w2_scale[e, n] first.
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= num_experts:
        return
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pair_ok = pair < num_pairs
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < HIDDEN
    ks = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + pair[:, None] * stride_hp
    w_cols = w2_ptr + e * stride_we + n.to(tl.int64)[None, :] * stride_wh  # tiles of w2[e]^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        k = k0 + ks
        k_ok = k < INTER
        ht = tl.load(h_rows + k[None, :], mask=pair_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_cols + k[:, None] * stride_wi, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if W_FP8:
            wt = e4m3_to(wt, h_ptr.dtype.element_ty, SOFT_FP8)
        acc = _dot(ht, wt, acc, F32_DOT)
    if W_FP8:
        scale = tl.load(w2_scale_ptr + e * stride_se + n.to(tl.int64) * stride_sn, mask=n_ok, other=0.0)
        acc = acc * scale[None, :]
    weight = tl.load(topk_weights_ptr + pair, mask=pair_ok, other=0.0)  # float32, flat [T * K]
    out_ptrs = out_ptr + pair[:, None] * stride_op + n[None, :]
    tl.store(out_ptrs, acc * weight[:, None], mask=pair_ok[:, None] & n_ok[None, :])


def moe_padded_len(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The static length of :func:`moe_align`'s ``sorted_ids``: the most slots ``num_pairs`` pairs
    grouped by expert take when each group is padded to a multiple of ``block_m``. A group of
    ``c > 0`` pairs pads to at most ``c + block_m - 1`` slots and at most ``min(E, num_pairs)``
    groups are non-empty, so ``ceil((num_pairs + min(E, num_pairs) * (block_m - 1)) / block_m) *
    block_m`` (vLLM's bound with ``E`` capped by the pairs: a decode step of few tokens over many
    experts gets ``num_pairs * block_m`` slots, not ``E * block_m``)."""
    groups = min(num_experts, num_pairs)
    return triton.cdiv(num_pairs + groups * (block_m - 1), block_m) * block_m


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the ``T * K`` (token, k) pairs of ``topk_ids`` ``[T, K]`` (int32/int64 in
    ``[0, num_experts)``, not checked) by expert in blocks of ``block_m``; returns
    ``(sorted_ids, block_expert)``, both int32 on ``topk_ids``' device:

    * ``sorted_ids`` ``[moe_padded_len(T * K, E, block_m)]``: the pair ids ``t * K + k``, expert
      by expert in increasing expert order, each expert's pairs in increasing pair order (a
      stable sort) and its group padded to a multiple of ``block_m`` with the sentinel ``T * K``;
      the slots past the last group hold the sentinel too.
    * ``block_expert`` ``[len(sorted_ids) // block_m]``: the expert of each block's pairs, ``E``
      for the blocks past the last group (they hold only sentinels).

    Torch ops only, with no host synchronization and shapes that depend on ``T``, ``K``, ``E`` and
    ``block_m`` alone, so it can be captured in a CUDA graph (``torch.bincount`` is not used: on
    CUDA it reads the largest id back to size its output)."""
    if block_m <= 0:
        raise ValueError(f"moe_align: block_m must be positive, got {block_m}")
    device = topk_ids.device
    expert_of_pair = topk_ids.reshape(-1).long()
    num_pairs = expert_of_pair.numel()
    length = moe_padded_len(num_pairs, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, expert_of_pair, torch.ones_like(expert_of_pair))
    padded = (counts + block_m - 1) // block_m * block_m
    group_end = torch.cumsum(padded, 0)  # padded slots [group_start[e], group_end[e]) of expert e
    group_start = group_end - padded
    first_rank = torch.cumsum(counts, 0) - counts  # the position of expert e's first pair, unpadded
    order = torch.argsort(expert_of_pair, stable=True)  # pair ids, expert by expert
    expert_sorted = expert_of_pair.index_select(0, order)
    # The j-th pair in sorted order is the (j - first_rank[e])-th of its expert e.
    rank_in_group = torch.arange(num_pairs, device=device) - first_rank.index_select(0, expert_sorted)
    slot = group_start.index_select(0, expert_sorted) + rank_in_group
    sorted_ids = torch.full((length,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, slot, order.to(torch.int32))
    # A block's expert: the first expert whose padded group ends after the block starts (groups
    # of no pairs end where they start and are passed over); none (E) past the last group.
    block_start = torch.arange(0, length, block_m, device=device)
    block_expert = torch.searchsorted(group_end, block_start, right=True).to(torch.int32)
    return sorted_ids, block_expert


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, *, block_m: int | None = None,
              block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """Triton :func:`kernels.reference.fused_moe`: ``x`` ``[T, H]`` (float32, bfloat16 or
    float16), ``w13`` ``[E, 2I, H]`` and ``w2`` ``[E, H, I]`` of ``x``'s dtype, float32
    ``topk_weights`` ``[T, K]``, ``topk_ids`` ``[T, K]`` (int32/int64 in ``[0, E)``, not checked;
    a token's ids need not be distinct) -> ``[T, H]`` in ``x``'s dtype. Any strides.

    FP8 experts (W8A16): ``w13`` and ``w2`` ``float8_e4m3fn`` with float32 per-row scales
    ``w13_scale`` ``[E, 2I]`` and ``w2_scale`` ``[E, H]`` (both or neither); ``x`` stays
    16/32-bit.

    Tiling (powers of two >= 16): ``block_m`` pairs per block (default 16 while the pairs per
    expert average at most 16, 32 up to 64, else 64: small batches waste less padding),
    ``block_n`` columns per program (default 64) and ``block_k`` per product step (default 64 for
    16-bit inputs, 32 for float32), each at most its dimension rounded up to a power of two."""
    tokens, hidden, num_experts, inter, top_k = _check_shapes(x, w13, w2, topk_weights, topk_ids,
                                                              w13_scale, w2_scale)
    num_pairs = tokens * top_k
    if num_pairs == 0 or inter == 0 or hidden == 0:
        return torch.zeros_like(x)
    if block_m is None:
        per_expert = num_pairs / num_experts
        block_m = 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64
    block_k_default = _BLOCK_K_FP32 if x.dtype == torch.float32 else _BLOCK_K_16BIT
    # Kernel 1 reduces over H into I columns, kernel 2 over I into H columns.
    n_up, k_up = _blocks(block_n, block_k, inter, hidden, block_k_default)
    n_down, k_down = _blocks(block_n, block_k, hidden, inter, block_k_default)
    _check_block(block_m, "block_m")
    sorted_ids, block_expert = moe_align(topk_ids, num_experts, block_m)
    num_blocks = block_expert.numel()
    f32_dot = _f32_dot(x)
    fp8 = w13_scale is not None and w2_scale is not None
    soft_fp8 = fp8 and software_fp8(x)
    # 16/32-bit experts: the kernels read no scale (W_FP8 off); the weights stand in as pointers.
    s13 = w13_scale if w13_scale is not None else w13
    s2 = w2_scale if w2_scale is not None else w2
    h = torch.empty((num_pairs, inter), dtype=x.dtype, device=x.device)
    _moe_gate_up_kernel[(num_blocks, triton.cdiv(inter, n_up))](
        x, w13, s13, sorted_ids, block_expert, h, num_pairs, num_experts, hidden, inter, top_k,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), s13.stride(0),
        s13.stride(1), h.stride(0),
        BLOCK_M=block_m, BLOCK_N=n_up, BLOCK_K=k_up, F32_DOT=f32_dot, W_FP8=fp8, SOFT_FP8=soft_fp8,
        num_warps=_NUM_WARPS)
    weights = topk_weights.reshape(-1)  # pair p's weight at p (a copy only if strided)
    out = torch.empty((num_pairs, hidden), dtype=torch.float32, device=x.device)
    _moe_down_kernel[(num_blocks, triton.cdiv(hidden, n_down))](
        h, w2, s2, weights, sorted_ids, block_expert, out, num_pairs, num_experts, hidden, inter,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), s2.stride(0), s2.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=n_down, BLOCK_K=k_down, F32_DOT=f32_dot, W_FP8=fp8, SOFT_FP8=soft_fp8,
        num_warps=_NUM_WARPS)
    return out.view(tokens, top_k, hidden).sum(dim=1).to(x.dtype)


def _f32_dot(x: torch.Tensor) -> bool:
    """Whether the products run in IEEE float32: for float32 inputs (no TF32: a float32 model
    matches the reference), and for bf16 off CUDA, where Triton's interpreter multiplies bf16
    ``tl.dot`` operands as their raw 16-bit integers (garbage); widened to float32 the products
    are exact and only the order of the float32 sums differs from the GPU's bf16 MMA."""
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not x.is_cuda)


def _check_shapes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None) -> tuple[int, int, int, int, int]:
    """``(T, H, E, I, K)`` of valid operands; ValueError otherwise."""
    if x.dim() != 2 or x.dtype not in _DTYPES:
        raise ValueError(f"fused_moe: x must be [T, H] float32/bfloat16/float16, got {tuple(x.shape)} "
                         f"{x.dtype}")
    if (w13_scale is None) != (w2_scale is None):
        raise ValueError("fused_moe: fp8 experts need both w13_scale and w2_scale (16/32-bit: neither), "
                         f"got w13_scale {'None' if w13_scale is None else 'a tensor'} and w2_scale "
                         f"{'None' if w2_scale is None else 'a tensor'}")
    weight_dtype = x.dtype if w13_scale is None else FP8_DTYPE
    tokens, hidden = x.shape
    if w13.dim() != 3 or w13.shape[2] != hidden or w13.shape[1] % 2 or w13.dtype != weight_dtype:
        raise ValueError(f"fused_moe: w13 must be [E, 2I, {hidden}] {weight_dtype}, got {tuple(w13.shape)} "
                         f"{w13.dtype}")
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    if w2.shape != (num_experts, hidden, inter) or w2.dtype != weight_dtype:
        raise ValueError(f"fused_moe: w2 must be [{num_experts}, {hidden}, {inter}] {weight_dtype}, got "
                         f"{tuple(w2.shape)} {w2.dtype}")
    for name, scale, rows in (("w13_scale", w13_scale, 2 * inter), ("w2_scale", w2_scale, hidden)):
        if scale is not None and (scale.shape != (num_experts, rows) or scale.dtype != torch.float32):
            raise ValueError(f"fused_moe: {name} must be float32 [{num_experts}, {rows}] (one scale per "
                             f"row), got {tuple(scale.shape)} {scale.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fused_moe: topk_ids must be int32/int64 [{tokens}, K], got "
                         f"{tuple(topk_ids.shape)} {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype != torch.float32:
        raise ValueError(f"fused_moe: topk_weights must be float32 {tuple(topk_ids.shape)}, got "
                         f"{tuple(topk_weights.shape)} {topk_weights.dtype}")
    if num_experts == 0:
        raise ValueError("fused_moe: w13 has no experts")
    return tokens, hidden, num_experts, inter, topk_ids.shape[1]


def _blocks(block_n: int | None, block_k: int | None, cols: int, depth: int,
            block_k_default: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_K)`` of a kernel writing ``cols`` columns from products over ``depth``."""
    n = block_n if block_n is not None else max(16, min(_BLOCK_N, triton.next_power_of_2(cols)))
    k = block_k if block_k is not None else max(16, min(block_k_default, triton.next_power_of_2(depth)))
    _check_block(n, "block_n")
    _check_block(k, "block_k")
    return n, k


def _check_block(block: int, name: str) -> None:
    if block < 16 or block & (block - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {block}")
