"""Block-wise FP8 linears (DeepSeek-style checkpoints: one float32 scale per ``[block_n, block_k]``
block of an e4m3 weight; docs/QUANTIZATION.md, "Block-wise FP8").

Numerics are those of :mod:`kernels.quant_reference` (``fp8_block_linear``,
``fp8_block_weight_only_linear``):
- a few tokens (``KernelOps.fp8_weight_only_max_m``, one-token decode by default): the dense
  GEMV of :mod:`kernels.triton_ops.gemv` on the 16-bit activation, each tile's products scaled by
  their blocks' scales in the loop (:func:`fp8_block_weight_only_linear`, gated too);
- more tokens (prefill, decode batches): the activation quantized per token in groups of
  ``block_k`` (:func:`quantize_fp8_per_token_group`, the reference's codes and scales bit for
  bit), then ``torch._scaled_mm``'s block-wise scaling where it computes correctly
  (:func:`scaled_mm_blocks_apply`, DECISIONS 145), else :func:`fp8_block_gemm`: ``tl.dot`` on
  e4m3 tiles one ``block_k`` slice at a time, each slice's sum scaled by the token group's and
  the weight block's scales before it joins the float32 accumulator.
On sm_90 the tensor cores sum one slice's e4m3 products in their reduced-precision accumulator
(about 13 fraction bits, docs/QUANTIZATION.md "Accumulation on the tensor cores"); the slice
is at most ``block_k`` (128 in published checkpoints) long, as in vLLM's block-fp8 kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.quant_reference import check_fp8_block
from kernels.quant_reference import fp8_block_linear as _reference_block_linear
from kernels.triton_ops.fp8_common import quantize_e4m3, row_scales, software_fp8
from kernels.triton_ops.gemv import MAX_M, GemvTiles, gemv_fp8_weight_only
from kernels.triton_ops.tiles import grouped_tile

# torch._scaled_mm's block-wise path takes token counts that are multiples of this (H100,
# torch 2.11, DECISIONS 145: others raised CUBLAS_STATUS_NOT_SUPPORTED); others are padded with
# zero rows.
SCALED_MM_ROWS = 4
# ... and inputs that are multiples of this (scaled_mm_blocks_apply).
SCALED_MM_K = 512
# The smallest block_k the tensor-core GEMM takes on a GPU (an e4m3 dot needs k >= 32 there);
# smaller blocks run the torch reference (tests' tiny models).
MIN_DOT_BLOCK_K = 32


@triton.jit
def _quantize_groups_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, stride_q, GROUP: tl.constexpr,
                            GROUPS: tl.constexpr, SOFT_FP8: tl.constexpr):
    # One token's GROUPS consecutive groups per program: each group's absolute maximum, its
    # scale and its e4m3 codes with quantize_fp8_rows' float32 operations (the same bits).
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    ok = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    inv, scale = row_scales(tl.max(tl.abs(x), axis=1))
    groups = K // GROUP
    tl.store(s_ptr + g.to(tl.int64) * M + row, scale, mask=g < groups)  # [groups, M]: token-minor
    tl.store(q_ptr + row * stride_q + cols, quantize_e4m3(x, inv[:, None], SOFT_FP8), mask=ok)


def quantize_fp8_per_token_group(
    x: torch.Tensor, group: int, *, pad_rows: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`kernels.quant_reference.quantize_fp8_per_token_group`: ``x`` ``[M, K]``
    (``K % group == 0``, ``group`` a power of two) -> ``(e4m3 [M, K], scales [M, K / group]
    float32)``, bit for bit. The scales are stored token-minor (strides ``(1, M)``), the layout
    ``torch._scaled_mm``'s block-wise scaling reads. ``pad_rows``: the results have ``M``
    rounded up to a multiple of it, the extra rows zero codes with scale 1."""
    m, k = x.shape
    if k % group or group & (group - 1):
        raise ValueError(f"per-token-group quantization needs K ({k}) to be a multiple of {group}, "
                         "a power of two")
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = -(-m // pad_rows) * pad_rows
    q = torch.empty((rows, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((k // group, rows), dtype=torch.float32, device=x.device).t()
    if rows > m:
        q[m:].zero_()
        scale[m:].fill_(1.0)
    if m == 0:
        return q, scale
    groups = max(1, min(triton.next_power_of_2(k // group), 4096 // group))
    _quantize_groups_kernel[(m, triton.cdiv(k // group, groups))](
        x, q, scale, rows, k, x.stride(0), q.stride(0), GROUP=group, GROUPS=groups,
        SOFT_FP8=software_fp8(x), num_warps=4,
    )
    return q, scale


@triton.jit
def _fp8_block_gemm_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om, stride_sm, stride_sk,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SBN: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # BLOCK_K is the weight's block_k: each iteration is one block column, whose dot product is
    # scaled by xs[m, kb] * ws[n // SBN, kb] before it is added (the blocks' scales differ).
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    kk = tl.arange(0, BLOCK_K)
    kb_count = K // BLOCK_K
    a_rows = xq_ptr + rm.to(tl.int64)[:, None] * stride_xm
    b_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    xs_rows = xs_ptr + rm.to(tl.int64) * stride_sm
    ws_rows = ws_ptr + (rn // SBN).to(tl.int64) * kb_count
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, kb_count):
        k0 = kb * BLOCK_K
        a = tl.load(a_rows + (k0 + kk)[None, :], mask=m_ok[:, None], other=0.0)
        b = tl.load(b_rows + (k0 + kk)[None, :], mask=n_ok[:, None], other=0.0)
        xs = tl.load(xs_rows + kb * stride_sk, mask=m_ok, other=0.0)
        ws = tl.load(ws_rows + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _gemm_tiles(m: int) -> tuple[int, int, int, int]:
    """(block_m, block_n, warps, stages) of the block GEMM for ``m`` tokens: the fastest or within
    10% of it at 16 / 256 / 2,048 tokens on llama3-8b's qkv, gate_up and down among nine tilings
    (H100, 2026-12-05; docs/QUANTIZATION.md, "Block-wise FP8")."""
    if m <= 256:
        return 64, 128, 4, 3
    return 128, 128, 8, 4


def fp8_block_gemm(
    x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
    block: tuple[int, int], bias: torch.Tensor | None, out_dtype: torch.dtype, *,
    tiles: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """``x_fp8`` ``[M, K]`` with per-token-group ``x_scale`` ``[M, K / bk]`` times ``w_fp8``
    ``[N, K]`` with block scales ``w_scale`` ``[ceil(N / bn), K / bk]`` (module docstring).
    ``tiles``: ``(block_m, block_n, warps, stages)`` (default :func:`_gemm_tiles`)."""
    bn, bk = check_fp8_block(block)
    m, k = x_fp8.shape
    n = w_fp8.shape[0]
    scales_ok = tuple(x_scale.shape) == (m, k // bk) and tuple(w_scale.shape) == (triton.cdiv(n, bn), k // bk)
    if k % bk or not scales_ok:
        raise ValueError(f"block GEMM: x {tuple(x_fp8.shape)} scales {tuple(x_scale.shape)}, "
                         f"w {tuple(w_fp8.shape)} scales {tuple(w_scale.shape)}, block {block}")
    out = torch.empty((m, n), dtype=out_dtype, device=x_fp8.device)
    if m == 0:
        return out
    bm, bnt, warps, stages = tiles or _gemm_tiles(m)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bnt),)
    _fp8_block_gemm_kernel[grid](
        x_fp8, x_scale, w_fp8, w_scale.contiguous(), bias if bias is not None else w_scale, out,
        m, n, k, x_fp8.stride(0), w_fp8.stride(0), out.stride(0), x_scale.stride(0), x_scale.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bnt, BLOCK_K=bk, SBN=bn, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )
    return out


def scaled_mm_blocks_apply(x: torch.Tensor, w_fp8: torch.Tensor, block: tuple[int, int]) -> bool:
    """Whether ``torch._scaled_mm`` takes this block-wise product: a Hopper GPU (cuBLASLt's
    1 x 128 activation and 128 x 128 weight scaling), bf16 activations, 128 x 128 blocks, ``N`` a
    multiple of 128 and ``K`` of 512. Elsewhere cuBLASLt returned garbage with no error raised
    (H100, torch 2.11: relative errors from 0.09 up to infinity at the 9 of 24 ``K`` values from
    128 to 28,672 whose ``K / 128`` is not a multiple of 4, right at the 15 that are; our reading:
    the weight scales' leading dimension, ``K / 128`` floats, must be 16-byte aligned); those
    layers run :func:`fp8_block_gemm`."""
    n, k = w_fp8.shape
    return (x.is_cuda and x.dtype == torch.bfloat16 and tuple(block) == (128, 128) and n % 128 == 0
            and k % SCALED_MM_K == 0 and torch.cuda.get_device_capability(x.device)[0] == 9)


def fp8_block_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int],
    bias: torch.Tensor | None = None, *, tiles: tuple[int, int, int, int] | None = None,
    use_scaled_mm: bool = True,
) -> torch.Tensor:
    """Triton :func:`kernels.quant_reference.fp8_block_linear` (W8A8, activations per token
    group): ``x`` ``[..., K]``, returns ``[..., N]`` in ``x.dtype``. The product runs in
    ``torch._scaled_mm`` where it applies (:func:`scaled_mm_blocks_apply`; 1.5-2.3x our Triton
    GEMM at 256-2,048 tokens on an H100) unless ``use_scaled_mm`` is False, else in
    :func:`fp8_block_gemm`; a ``block_k`` below :data:`MIN_DOT_BLOCK_K` on a GPU runs the reference."""
    bn, bk = check_fp8_block(block)
    n, k = w_fp8.shape
    if x.is_cuda and bk < MIN_DOT_BLOCK_K:
        return _reference_block_linear(x, w_fp8, w_scale, (bn, bk), bias)
    rows = x.reshape(-1, k)
    if use_scaled_mm and scaled_mm_blocks_apply(x, w_fp8, (bn, bk)) and rows.shape[0] > 0:
        # Scales as cuBLASLt reads them: xs [M, K/128] token-minor (as quantized), the weight's
        # [N/128, K/128] transposed to [K/128, N/128] (a view); M padded to a multiple of
        # SCALED_MM_ROWS (cuBLASLt refuses other counts: CUBLAS_STATUS_NOT_SUPPORTED). A bias
        # is added after the product's rounding to bf16 (one rounding more than the reference's).
        xq, xs = quantize_fp8_per_token_group(rows, bk, pad_rows=SCALED_MM_ROWS)
        y = torch._scaled_mm(xq, w_fp8.t(), scale_a=xs, scale_b=w_scale.t(), out_dtype=x.dtype)
        y = y[: rows.shape[0]]
        if bias is not None:
            y = (y.float() + bias.float()).to(x.dtype)
    else:
        xq, xs = quantize_fp8_per_token_group(rows, bk)
        y = fp8_block_gemm(xq, xs, w_fp8, w_scale, (bn, bk), bias, x.dtype, tiles=tiles)
    return y.reshape(*x.shape[:-1], n)


def fp8_block_weight_only_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int],
    bias: torch.Tensor | None = None, *, tiles: GemvTiles | None = None, pdl: bool = False,
) -> torch.Tensor:
    """Triton :func:`kernels.quant_reference.fp8_block_weight_only_linear` for up to
    ``gemv.MAX_M`` tokens of ``x`` ``[..., K]`` 16/32-bit (the GEMV with ``block``)."""
    n, k = w_fp8.shape
    rows = x.reshape(-1, k)
    if rows.shape[0] > MAX_M:
        raise ValueError(f"the block-wise fp8 GEMV takes at most {MAX_M} tokens, got {rows.shape[0]}")
    y = gemv_fp8_weight_only(rows, w_fp8, w_scale, bias, tiles=tiles, pdl=pdl, block=check_fp8_block(block))
    return y.reshape(*x.shape[:-1], n)


def fp8_block_weight_only_gated_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int],
    bias: torch.Tensor | None = None, *, tiles: GemvTiles | None = None, pdl: bool = False,
) -> torch.Tensor:
    """``silu_and_mul(fp8_block_weight_only_linear(...))`` for one token and a ``[gate; up]``
    weight, the activation in the GEMV's epilogue: ``[..., N / 2]``."""
    n, k = w_fp8.shape
    y = gemv_fp8_weight_only(x.reshape(-1, k), w_fp8, w_scale, bias, tiles=tiles, gated=True, pdl=pdl,
                             block=check_fp8_block(block))
    return y.reshape(*x.shape[:-1], n // 2)
