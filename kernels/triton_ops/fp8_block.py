"""Block-wise FP8 linears (DeepSeek-style checkpoints: one float32 scale per ``[block_n, block_k]``
block of an e4m3 weight; docs/QUANTIZATION.md, "Block-wise FP8").

Numerics are those of :mod:`kernels.quant_reference` (``fp8_block_linear``,
``fp8_block_weight_only_linear``):
- a few tokens (``KernelOps.fp8_weight_only_max_m``, one-token decode by default): the dense
  GEMV of :mod:`kernels.triton_ops.gemv` on the 16-bit activation, each tile's products scaled by
  their blocks' scales in the loop (:func:`fp8_block_weight_only_linear`, gated too);
- more tokens (prefill, decode batches): the activation quantized per token in groups of
  ``block_k`` (:func:`quantize_fp8_per_token_group`: the per-token kernel over ``[M * K / bk, bk]``
  rows, so its codes and scales are the reference's bit for bit), then :func:`fp8_block_gemm`:
  ``tl.dot`` on e4m3 tiles one ``block_k`` slice at a time, each slice's sum scaled by the token
  group's and the weight block's scales before it joins the float32 accumulator.
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
from kernels.triton_ops.fp8_matmul import quantize_fp8_per_token
from kernels.triton_ops.gemv import MAX_M, GemvTiles, gemv_fp8_weight_only

# The smallest block_k the tensor-core GEMM takes on a GPU (an e4m3 dot needs k >= 32 there);
# smaller blocks run the torch reference (tests' tiny models).
MIN_DOT_BLOCK_K = 32


def quantize_fp8_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`kernels.quant_reference.quantize_fp8_per_token_group`: ``x`` ``[M, K]``
    (``K % group == 0``) -> ``(e4m3 [M, K], scales [M, K / group] float32)``, bit for bit."""
    m, k = x.shape
    if k % group:
        raise ValueError(f"per-token-group quantization needs K ({k}) to be a multiple of {group}")
    q, scale = quantize_fp8_per_token(x.contiguous().reshape(-1, group))
    return q.reshape(m, k), scale.reshape(m, k // group)


@triton.jit
def _fp8_block_gemm_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
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
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    kk = tl.arange(0, BLOCK_K)
    kb_count = K // BLOCK_K
    a_rows = xq_ptr + rm.to(tl.int64)[:, None] * stride_xm
    b_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    xs_rows = xs_ptr + rm.to(tl.int64) * kb_count
    ws_rows = ws_ptr + (rn // SBN).to(tl.int64) * kb_count
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, kb_count):
        k0 = kb * BLOCK_K
        a = tl.load(a_rows + (k0 + kk)[None, :], mask=m_ok[:, None], other=0.0)
        b = tl.load(b_rows + (k0 + kk)[None, :], mask=n_ok[:, None], other=0.0)
        xs = tl.load(xs_rows + kb, mask=m_ok, other=0.0)
        ws = tl.load(ws_rows + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _gemm_tiles(m: int) -> tuple[int, int, int, int]:
    """(block_m, block_n, warps, stages) of the block GEMM for ``m`` tokens."""
    if m <= 16:
        return 16, 64, 4, 4
    if m <= 64:
        return 64, 64, 4, 4
    return 128, 128, 8, 3


def fp8_block_gemm(
    x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
    block: tuple[int, int], bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """``x_fp8`` ``[M, K]`` with per-token-group ``x_scale`` ``[M, K / bk]`` times ``w_fp8``
    ``[N, K]`` with block scales ``w_scale`` ``[ceil(N / bn), K / bk]`` (module docstring)."""
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
    bm, bnt, warps, stages = _gemm_tiles(m)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bnt),)
    _fp8_block_gemm_kernel[grid](
        x_fp8, x_scale.contiguous(), w_fp8, w_scale.contiguous(), bias if bias is not None else w_scale, out,
        m, n, k, x_fp8.stride(0), w_fp8.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bnt, BLOCK_K=bk, SBN=bn, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )
    return out


def fp8_block_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton :func:`kernels.quant_reference.fp8_block_linear` (W8A8, activations per token
    group): ``x`` ``[..., K]``, returns ``[..., N]`` in ``x.dtype``. A ``block_k`` below
    :data:`MIN_DOT_BLOCK_K` on a GPU runs the reference."""
    bn, bk = check_fp8_block(block)
    n, k = w_fp8.shape
    if x.is_cuda and bk < MIN_DOT_BLOCK_K:
        return _reference_block_linear(x, w_fp8, w_scale, (bn, bk), bias)
    xq, xs = quantize_fp8_per_token_group(x.reshape(-1, k), bk)
    y = fp8_block_gemm(xq, xs, w_fp8, w_scale, (bn, bk), bias, x.dtype)
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
