"""RMSNorm and RMSNorm fused with the residual add (one pass over each row).

Rounding follows :func:`kernels.reference.rms_norm` step by step: the residual sum is
rounded to the input dtype, the normalised row is rounded to the input dtype before the
weight multiply, and the product is rounded to the promoted output dtype. Only the order of
the float32 sum of squares differs from torch.

The ``*_fp8`` variants quantize the rounded output per token in the same program (the row is
already in registers: its absolute maximum, then e4m3 codes, as
:func:`kernels.quant_reference.quantize_fp8_rows` computes them) and write only the codes and
the scale, for the fp8 linear that follows (:class:`kernels.quant_reference.Fp8Activation`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.quant_reference import FP8_DTYPE, Fp8Activation
from kernels.triton_ops.fp8_common import quantize_e4m3, row_scales, software_fp8
from kernels.triton_ops.pdl import pdl_begin, pdl_launch


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    sum_out_ptr,
    q_ptr,
    s_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_sum,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    QUANT: tl.constexpr,
    SOFT_FP8: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: read before the wait
    pdl_begin(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # Round the sum to its dtype (promoted from x and residual), as torch's add does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_out_ptr.dtype.element_ty)
        tl.store(sum_out_ptr + row * stride_sum + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / hidden
    rstd = 1.0 / tl.sqrt(var + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    y = (normed * w).to(out_ptr.dtype.element_ty)
    if QUANT:  # out_ptr only names the output dtype; the codes go to q_ptr (row stride hidden)
        yf = y.to(tl.float32)
        inv, scale = row_scales(tl.max(tl.abs(yf), axis=0))
        tl.store(s_ptr + row, scale)
        tl.store(q_ptr + row * hidden + cols, quantize_e4m3(yf, inv, SOFT_FP8), mask=mask)
    else:
        tl.store(out_ptr + row * stride_out + cols, y, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, hidden]`` with a unit last stride (a view where possible)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def _launch(
    x2: torch.Tensor,
    res2: torch.Tensor | None,
    weight: torch.Tensor,
    out2: torch.Tensor,
    sum2: torch.Tensor | None,
    eps: float,
    quant: tuple[torch.Tensor, torch.Tensor] | None = None,
    pdl: bool = False,
) -> None:
    hidden = x2.shape[1]
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block // 256, 1), 16)
    has_res = res2 is not None and sum2 is not None
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        res2 if has_res else x2,
        weight,
        out2,
        sum2 if has_res else out2,
        quant[0] if quant is not None else out2,
        quant[1] if quant is not None else out2,
        x2.stride(0),
        res2.stride(0) if res2 is not None else 0,
        out2.stride(0),
        sum2.stride(0) if sum2 is not None else 0,
        hidden,
        eps,
        HAS_RESIDUAL=has_res,
        QUANT=quant is not None,
        SOFT_FP8=software_fp8(x2),
        BLOCK=block,
        num_warps=num_warps,
        **pdl_launch(pdl),
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None, pdl: bool = False
) -> torch.Tensor:
    """Triton :func:`kernels.reference.rms_norm`; ``out`` (optional) receives the result. ``pdl``
    (every function here): launched with programmatic dependent launch (:mod:`kernels.triton_ops.pdl`)."""
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel() == 0:
        return out
    out2 = out.view(-1, x.shape[-1])
    _launch(_rows(x), None, weight, out2, None, eps, pdl=pdl)
    return out


def _add_norm_operands(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weight, out_dtype, x rows, residual rows, sum rows)`` of a fused add + norm: the sum
    goes in place into ``residual`` when its dtype is the sum's (a fresh tensor otherwise)."""
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    out_dtype = torch.promote_types(sum_dtype, weight.dtype)
    x2 = _rows(x)
    res2 = _rows(residual)
    sum2 = res2 if sum_dtype == residual.dtype else torch.empty(x2.shape, dtype=sum_dtype, device=x.device)
    return weight, out_dtype, x2, res2, sum2


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`kernels.reference.fused_add_rms_norm`, computed in place.

    The normalised output overwrites ``x`` and the sum overwrites ``residual`` (when their
    rows are unit-stride views; otherwise fresh tensors are returned). The returned tensors
    are the ones to use.
    """
    weight, out_dtype, x2, res2, sum2 = _add_norm_operands(x, residual, weight)
    # In place: each program reads its whole row before writing it, so aliasing is safe.
    out2 = x2 if out_dtype == x.dtype else torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if x.numel() == 0:
        return out2.view(x.shape), sum2.view(x.shape)
    _launch(x2, res2, weight, out2, sum2, eps, pdl=pdl)
    return out2.view(x.shape), sum2.view(x.shape)


def _fp8_out(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty e4m3 codes ``[rows, hidden]`` and float32 scales ``[rows, 1]`` for ``x``'s rows."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (torch.empty((rows, x.shape[-1]), dtype=FP8_DTYPE, device=x.device),
            torch.empty((rows, 1), dtype=torch.float32, device=x.device))


def _dtype_only(dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A stride-0 view of ``like``'s shape in ``dtype``: names the output dtype to a kernel that
    writes no 16-bit output."""
    return torch.empty((1, 1), dtype=dtype, device=like.device).expand(like.shape)


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl: bool = False) -> Fp8Activation:
    """Triton :func:`kernels.reference.rms_norm_fp8`: the 16-bit output is never written."""
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    q, scale = _fp8_out(x)
    if x.numel():
        x2 = _rows(x)
        _launch(x2, None, weight, _dtype_only(out_dtype, x2), None, eps, (q, scale), pdl)
    return Fp8Activation(q.view(x.shape), scale.view(*x.shape[:-1], 1), out_dtype)


def fused_add_rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl: bool = False
) -> tuple[Fp8Activation, torch.Tensor]:
    """Triton :func:`kernels.reference.fused_add_rms_norm_fp8`; the sum overwrites ``residual``
    as in :func:`fused_add_rms_norm` (use the returned tensor)."""
    weight, out_dtype, x2, res2, sum2 = _add_norm_operands(x, residual, weight)
    q, scale = _fp8_out(x)
    if x.numel():
        _launch(x2, res2, weight, _dtype_only(out_dtype, x2), sum2, eps, (q, scale), pdl)
    return Fp8Activation(q.view(x.shape), scale.view(*x.shape[:-1], 1), out_dtype), sum2.view(x.shape)
