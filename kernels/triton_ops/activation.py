"""SiLU-and-multiply (the gate of a SwiGLU MLP) in one pass, and fused with the per-token fp8
quantization of its result (:func:`silu_and_mul_fp8`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.quant_reference import FP8_DTYPE, Fp8Activation
from kernels.triton_ops.fp8_common import quantize_e4m3, row_scales, software_fp8


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    y = silu_mul_tile(gate, up)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def silu_mul_tile(gate, up):
    g = gate.to(tl.float32)
    # torch rounds silu(gate) to the input dtype before the multiply; so do we.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    return act * up.to(tl.float32)


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, q_ptr, s_ptr, stride_x, d,
                             SOFT_FP8: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row (the scale needs the row's maximum). A row that fits one block is
    # computed once; a longer one is computed twice (maximum, then codes) rather than stored.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < d
        gate = tl.load(x_row + cols, mask=mask, other=0.0)
        y = silu_mul_tile(gate, tl.load(x_row + d + cols, mask=mask, other=0.0)).to(gate.dtype).to(tl.float32)
        inv, scale = row_scales(tl.max(tl.abs(y), axis=0))
        tl.store(s_ptr + row, scale)
        tl.store(q_ptr + row * d + cols, quantize_e4m3(y, inv, SOFT_FP8), mask=mask)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, d, BLOCK):
            mask = c0 + cols < d
            gate = tl.load(x_row + c0 + cols, mask=mask, other=0.0)
            y = silu_mul_tile(gate, tl.load(x_row + d + c0 + cols, mask=mask, other=0.0)).to(gate.dtype)
            amax = tl.maximum(amax, tl.abs(y.to(tl.float32)))
        inv, scale = row_scales(tl.max(amax, axis=0))
        tl.store(s_ptr + row, scale)
        for c0 in range(0, d, BLOCK):
            mask = c0 + cols < d
            gate = tl.load(x_row + c0 + cols, mask=mask, other=0.0)
            y = silu_mul_tile(gate, tl.load(x_row + d + c0 + cols, mask=mask, other=0.0)).to(gate.dtype)
            tl.store(q_ptr + row * d + c0 + cols, quantize_e4m3(y.to(tl.float32), inv, SOFT_FP8), mask=mask)


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton :func:`kernels.reference.silu_and_mul`; ``out`` (optional) receives the result."""
    d = x.shape[-1] // 2
    if out is None:
        out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    x2 = x2.reshape(-1, 2 * d)
    out2 = out.view(-1, d)
    block = min(triton.next_power_of_2(d), 1024)
    grid = (x2.shape[0], triton.cdiv(d, block))
    _silu_and_mul_kernel[grid](x2, out2, x2.stride(0), out2.stride(0), d, BLOCK=block, num_warps=4)
    return out


def silu_and_mul_fp8(x: torch.Tensor) -> Fp8Activation:
    """Triton :func:`kernels.reference.silu_and_mul_fp8`: one program per token, the 16-bit
    product never written."""
    d = x.shape[-1] // 2
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    q = torch.empty((rows, d), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        x2 = (x if x.stride(-1) == 1 else x.contiguous()).reshape(-1, 2 * d)
        block = min(triton.next_power_of_2(d), 16384)
        _silu_and_mul_fp8_kernel[(rows,)](x2, q, scale, x2.stride(0), d, SOFT_FP8=software_fp8(x2),
                                          ONE_BLOCK=block >= d, BLOCK=block,
                                          num_warps=min(max(block // 1024, 4), 16))
    return Fp8Activation(q.view(*x.shape[:-1], d), scale.view(*x.shape[:-1], 1), x.dtype)
