"""float8 e4m3 conversion shared by the fp8 kernels (linear, KV store, attention).

Quantization is ``e4m3(clamp(x * inv_scale, -448, 448))``, round to nearest even, as
:mod:`kernels.quant_reference` computes it with torch. On a GPU the cast is the hardware
conversion (``cvt.rn.satfinite.e4m3x2.f32`` on sm_89+). Triton's CPU interpreter rounds
float32 -> e4m3 wrongly (ties away from zero, and a mantissa carry does not reach the
exponent: -124 becomes -64), so on the CPU the kernels convert with
:func:`e4m3_from_float32_software`, integer code that rounds exactly as torch does. The
interpreted tests check that code bit for bit against torch; the GPU tests check the
hardware path the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_E4M3_MAX = 448.0  # = kernels.quant_reference.FP8_E4M3_MAX (literal in the kernels)
FP8_MIN_AMAX = 1e-12  # = kernels.quant_reference.FP8_MIN_AMAX


def software_fp8(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device must use the integer e4m3 conversion (the interpreter)."""
    return not t.is_cuda


@triton.jit
def e4m3_from_float32_software(x):
    """Round float32 ``x`` (already within +-448, or NaN) to e4m3, nearest even, in integer ops."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    # Normal e4m3 (|x| >= 2^-6): drop 20 of float32's 23 mantissa bits, ties to even; the
    # carry may run into the exponent, as it should. Then rebias the exponent (127 -> 7).
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal e4m3: multiples of 2^-9, encoded as the integer |x| * 2^9 (0..8; 8 is 2^-6).
    shift = tl.minimum(141 - (a >> 23), 30)
    m = (a & 0x7FFFFF) | 0x800000
    q0 = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    sub = q0 + ((rem > half) | ((rem == half) & ((q0 & 1) == 1))).to(tl.int32)
    out = tl.where(a >= 0x3C800000, normal, sub)
    out = tl.where(a > 0x7F800000, 0x7F, out)  # NaN stays NaN
    return (out | sign).to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def quantize_e4m3(x, inv_scale, SOFTWARE: tl.constexpr):
    """``e4m3(clamp(x * inv_scale, -448, 448))`` for float32 ``x`` and ``inv_scale``."""
    y = tl.minimum(tl.maximum(x * inv_scale, -448.0), 448.0)
    if SOFTWARE:
        q = e4m3_from_float32_software(y)
    else:
        q = y.to(tl.float8e4nv)
    return q


@triton.jit
def row_scales(amax):
    """``(inv_scale, scale)`` of rows whose absolute maximum is ``amax`` (float32, floored)."""
    amax = tl.maximum(amax, 1e-12)
    fp8_max = tl.full(amax.shape, 448.0, tl.float32)
    return tl.div_rn(fp8_max, amax), tl.div_rn(amax, fp8_max)
