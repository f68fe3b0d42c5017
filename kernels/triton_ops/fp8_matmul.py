"""FP8 W8A8 linear: per-token activation quantization, a fused GEMV for small batches, a
tiled GEMM, and :func:`fp8_linear`, which picks between them and ``torch._scaled_mm``.

Numerics are those of :func:`kernels.quant_reference.fp8_linear` whichever path runs:
activations quantized per token with the same float32 operations (bit-identical e4m3
values and scales), e4m3 x e4m3 products (exact in float32), float32 sums, then
``acc * x_scale[m] * w_scale[n] (+ bias)``.

(:func:`fp8_weight_only_linear` is the W8A16 GEMV that one-token decode runs instead, on the
unquantized activation: ``kernels.KernelOps.fp8_weight_only_max_m``.)

Paths, by the number of tokens ``M`` (``Fp8LinearConfig.gemv_max_m`` is the threshold):
- ``M <= gemv_max_m``: :func:`quantize_fp8_per_token` (unless the activation comes quantized
  already, an :class:`~kernels.quant_reference.Fp8Activation` from a fused norm or activation)
  then :func:`kernels.triton_ops.gemv.gemv_fp8`, which streams the weight at 78-94% of copy
  bandwidth on an H200 at one token (docs/QUANTIZATION.md, "One-token GEMV"). The fused kernel
  it replaced re-read and re-quantized the activation in every program (22-46%; 2-6x slower
  at 2-16 tokens).
- larger ``M``: :func:`quantize_fp8_per_token` then ``torch._scaled_mm`` (cuBLASLt,
  row-wise scales) on CUDA with bf16 activations, else :func:`fp8_gemm` (Triton,
  ``tl.dot`` on e4m3 tiles).
``_scaled_mm`` wants ``mat2`` column-major: ``w_fp8.t()`` of our row-major ``[N, K]`` weight
is exactly that, so the weight is stored once, as ``nn.Linear`` holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.quant_reference import Fp8Activation
from kernels.rope_store import RopeStore
from kernels.triton_ops import gemv as gemv_mod
from kernels.triton_ops.fp8_common import quantize_e4m3, row_scales, software_fp8
from kernels.triton_ops.gemv import MAX_M as MAX_GEMV_M
from kernels.triton_ops.gemv import GemvTiles, fp8_tiles, gemv_fp8, gemv_fp8_weight_only, rope_fits
from kernels.triton_ops.tiles import grouped_tile


@dataclass(frozen=True)
class Fp8LinearConfig:
    """Dispatch and tiling of :func:`fp8_linear` (``None``: chosen from the shapes)."""

    gemv_max_m: int = 1  # tokens up to which gemv.gemv_fp8 runs (at most gemv.MAX_M)
    use_scaled_mm: bool = True  # torch._scaled_mm above gemv_max_m where it applies
    scaled_mm_fast_accum: bool = False
    gemv_tiles: GemvTiles | None = None  # None: gemv.fp8_tiles(M, N, K)
    gemm_block_m: int = 128
    gemm_block_n: int = 128
    gemm_block_k: int = 128
    gemm_num_warps: int = 8
    gemm_num_stages: int = 3
    # Products of e4m3 tiles that the tensor cores sum in their reduced-precision accumulator
    # (about 13 fraction bits, truncated, on sm_90) before the partial sum is added to a float32
    # accumulator (Triton's max_num_imprecise_acc; capped at gemm_block_k). None: Triton's own
    # default, which on sm_90 never promotes: the whole K sum then carries that precision
    # (docs/QUANTIZATION.md, "Accumulation on the tensor cores").
    gemm_max_imprecise_acc: int | None = 128

    def __post_init__(self) -> None:
        if not 0 <= self.gemv_max_m <= MAX_GEMV_M:
            raise ValueError(f"gemv_max_m must be in [0, {MAX_GEMV_M}]")
        if self.gemm_max_imprecise_acc is not None and self.gemm_max_imprecise_acc < 1:
            raise ValueError("gemm_max_imprecise_acc must be >= 1 (or None)")
        for name in ("gemm_block_m", "gemm_block_n", "gemm_block_k"):
            v = getattr(self, name)
            if v is not None and (v & (v - 1) or v < 1):
                raise ValueError(f"{name} must be a power of two, got {v}")


_DEFAULT = Fp8LinearConfig()


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK_K: tl.constexpr, SOFT_FP8: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    inv, scale = row_scales(tl.max(amax, axis=0))
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + cols < K
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + k0 + cols, quantize_e4m3(x, inv, SOFT_FP8), mask=ok)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`kernels.quant_reference.quantize_fp8_per_token`: ``x`` ``[M, K]`` ->
    ``(x_fp8 [M, K] e4m3, scale [M, 1] float32)``, bit-identical to the reference."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block_k = min(triton.next_power_of_2(k), 4096)
    _quantize_rows_kernel[(m,)](
        x, q, scale, k, x.stride(0), q.stride(0),
        BLOCK_K=block_k, SOFT_FP8=software_fp8(x), num_warps=4 if block_k <= 2048 else 8,
    )
    return q, scale


def fp8_gemv(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: Fp8LinearConfig | None = None,
) -> torch.Tensor:
    """The GEMV path for a few tokens (``M <= gemv.MAX_M``): per-token quantization, then
    :func:`kernels.triton_ops.gemv.gemv_fp8`. ``x`` ``[M, K]`` unquantized; other arguments as
    in :func:`fp8_linear`."""
    config = config or _DEFAULT
    xq, xs = quantize_fp8_per_token(x)
    return gemv_fp8(xq, xs, w_fp8, w_scale, bias, x.dtype, tiles=config.gemv_tiles)


@triton.jit
def _fp8_gemm_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    IMPRECISE_ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    kk = tl.arange(0, BLOCK_K)
    a_rows = xq_ptr + rm.to(tl.int64)[:, None] * stride_xm
    b_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk < K)[None, :]
        a = tl.load(a_rows + (k0 + kk)[None, :], mask=m_ok[:, None] & k_ok, other=0.0)
        b = tl.load(b_rows + (k0 + kk)[None, :], mask=n_ok[:, None] & k_ok, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=IMPRECISE_ACC)

    x_scale = tl.load(xs_ptr + rm, mask=m_ok, other=0.0)
    w_scale = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
    y = acc * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_gemm(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    config: Fp8LinearConfig | None = None,
) -> torch.Tensor:
    """Triton GEMM of pre-quantized activations (``x_fp8`` ``[M, K]``, ``x_scale`` ``[M, 1]``)."""
    config = config or _DEFAULT
    m, k = x_fp8.shape
    n = w_fp8.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x_fp8.device)
    if m == 0:
        return out
    bm, bn, bk = config.gemm_block_m, config.gemm_block_n, config.gemm_block_k
    imprecise = None if config.gemm_max_imprecise_acc is None else min(config.gemm_max_imprecise_acc, bk)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fp8_gemm_kernel[grid](
        x_fp8, x_scale, w_fp8, w_scale, bias if bias is not None else w_scale, out,
        m, n, k, x_fp8.stride(0), w_fp8.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, IMPRECISE_ACC=imprecise,
        num_warps=config.gemm_num_warps, num_stages=config.gemm_num_stages,
    )
    return out


def scaled_mm_applies(x: torch.Tensor, dtype: torch.dtype, w_fp8: torch.Tensor) -> bool:
    """Whether ``torch._scaled_mm`` with row-wise scales takes this call: CUDA, bf16 activations
    ``dtype`` (the one output dtype every row-wise backend accepts: the CUTLASS fallback takes
    only bf16), ``K`` and ``N`` multiples of 16."""
    n, k = w_fp8.shape
    return x.is_cuda and dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0


def fp8_linear(
    x: torch.Tensor | Fp8Activation,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: Fp8LinearConfig | None = None,
) -> torch.Tensor:
    """Triton/cuBLASLt :func:`kernels.quant_reference.fp8_linear`.

    ``x`` ``[..., K]`` (or an :class:`Fp8Activation`: quantized already, by a fused norm or
    activation), ``w_fp8`` ``[N, K]`` e4m3 row-major (contiguous), ``w_scale`` ``[N]`` float32
    (contiguous), ``bias`` ``[N]`` or None; returns ``[..., N]`` in ``x.dtype``.
    ``config`` sets the dispatch threshold and tilings (module docstring).
    """
    config = config or _DEFAULT
    n, k = w_fp8.shape
    lead = x.shape[:-1]
    out_dtype = x.dtype
    if isinstance(x, Fp8Activation):
        xq, xs = x.q.reshape(-1, k), x.scale.reshape(-1, 1)
    else:
        xq, xs = quantize_fp8_per_token(x.reshape(-1, k))
    if xq.shape[0] <= config.gemv_max_m:
        y = gemv_fp8(xq, xs, w_fp8, w_scale, bias, out_dtype, tiles=config.gemv_tiles)
    else:
        y = _fp8_gemm_path(xq, xs, w_fp8, w_scale, bias, out_dtype, config)
    return y.reshape(*lead, n)


def fp8_weight_only_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
    tiles: GemvTiles | None = None, pdl: bool = False,
) -> torch.Tensor:
    """Triton :func:`kernels.quant_reference.fp8_weight_only_linear` for up to ``gemv.MAX_M``
    tokens (:func:`kernels.triton_ops.gemv.gemv_fp8_weight_only`): ``x`` ``[..., K]`` 16/32-bit."""
    n, k = w_fp8.shape
    y = gemv_fp8_weight_only(x.reshape(-1, k), w_fp8, w_scale, bias, tiles=tiles, pdl=pdl)
    return y.reshape(*x.shape[:-1], n)


def fp8_weight_only_gated_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
    tiles: GemvTiles | None = None, pdl: bool = False,
) -> torch.Tensor:
    """``silu_and_mul(fp8_weight_only_linear(x, w_fp8, ...))`` for one token of ``x`` ``[..., K]``
    and a ``[gate; up]`` weight: the activation in the GEMV's epilogue, bit-for-bit the two ops
    (:func:`kernels.triton_ops.gemv.gemv_fp8_weight_only` with ``gated``). Returns ``[..., N / 2]``."""
    n, k = w_fp8.shape
    y = gemv_fp8_weight_only(x.reshape(-1, k), w_fp8, w_scale, bias, tiles=tiles, gated=True, pdl=pdl)
    return y.reshape(*x.shape[:-1], n // 2)


def fp8_weight_only_rope_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, rope: RopeStore,
    *, pdl: bool = False,
) -> torch.Tensor | None:
    """For one token of ``x`` and a layer's fp8 ``[q; k; v]`` weight (per-channel scales): the
    weight-only GEMV with rotary and the K/V store in its epilogue
    (:func:`kernels.triton_ops.gemv.gemv_fp8_weight_only` with ``rope``), bit for bit
    :func:`fp8_weight_only_linear` then ``rotary_store_kvcache``, returning the rotated q
    ``[1, Hq * D]``; None where it does not apply (``gemv.DENSE_ROPE`` off, more tokens, a
    one-row tiling, a cache or shape ``rope`` refuses)."""
    n, k = w_fp8.shape
    x2 = x.reshape(-1, k)
    tiles = fp8_tiles(1, n, k)
    if not gemv_mod.DENSE_ROPE or x2.shape[0] != 1 or not rope_fits(n, k, tiles, rope):
        return None
    return gemv_fp8_weight_only(x2, w_fp8, w_scale, bias, tiles=tiles, pdl=pdl, rope=rope)


def _fp8_gemm_path(xq: torch.Tensor, xs: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype,
                   config: Fp8LinearConfig) -> torch.Tensor:
    """Quantized activations through ``torch._scaled_mm`` where it applies, else :func:`fp8_gemm`."""
    n = w_fp8.shape[0]
    if config.use_scaled_mm and scaled_mm_applies(xq, out_dtype, w_fp8):
        fused_bias = bias is not None and bias.dtype == out_dtype
        y = torch._scaled_mm(
            xq, w_fp8.t(), scale_a=xs, scale_b=w_scale.view(1, n),
            bias=bias if fused_bias else None, out_dtype=out_dtype,
            use_fast_accum=config.scaled_mm_fast_accum,
        )
        if bias is not None and not fused_bias:
            y = (y.float() + bias.float()).to(out_dtype)
        return y
    return fp8_gemm(xq, xs, w_fp8, w_scale, bias, out_dtype, config=config)
