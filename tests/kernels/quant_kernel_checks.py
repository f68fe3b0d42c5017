"""Quantized kernels (fp8 linear, WnA16 linear, fp8 KV cache) against their torch references.

Shared by the interpreted (CPU) and the GPU test modules, like ``kernel_checks.py``:
``python -m tests.kernels.quant_kernel_checks [DTYPE [CHECK ...]]`` prints one JSON object
``{name: "ok" | traceback}``. Inputs are random (never zeros); fp8 values are bit-compared
where kernel and reference do the same float32 operations.

Tolerances (``dtype`` is the activation dtype):
- quantization (activations, KV store): bit-identical e4m3 values and float32 scales;
- linear outputs, float32: :func:`assert_close` with ``scale`` the output's magnitude (the
  float32 sums differ only in order); bf16: within one bf16 rounding (2^-7 relative) plus
  2e-3 of the output's magnitude (float32 order and FMA-contraction differences before it);
- attention over fp8 caches: :func:`kernel_checks.assert_close` as for 16/32-bit caches
  (both read the same e4m3 values, exactly converted, and scale in float32);
- fp8 products on CUDA tensor cores (the Triton GEMM's ``tl.dot``, ``torch._scaled_mm``): the
  sm_90 fp8 MMA does not sum in IEEE float32; it keeps about 13 fraction bits of each partial
  sum (truncated). The kernel adds its partial sums into a float32 accumulator every 128
  products (``Fp8LinearConfig.gemm_max_imprecise_acc``), so on top of the tolerances above each
  output may be off by ``2^-11 * sum_k |xq_k * wq_k| * x_scale * w_scale``
  (:func:`assert_fp8_product_close`). An emulation of that accumulator on the CPU reproduces the
  error an H200 run reported for the unpromoted kernel exactly (20x48x96 in float32: max abs
  error 1.237e-3, 0.45 of 2^-12 of the sum of absolute products; docs/QUANTIZATION.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch

from kernels import quant_reference as qref
from kernels import reference
from kernels import triton_ops as tops
from kernels.rope_store import RopeStore
from kernels.triton_ops import fp8_block as tblock
from kernels.triton_ops import fp8_matmul as tfp8
from kernels.triton_ops import gemv as tgemv
from kernels.triton_ops import wna16 as twna16
from kernels.triton_ops import wna16_mma as tmma
from tests.kernels.kernel_checks import (
    PagedBatch,
    Target,
    _fused_qkv_views,
    _store_slots,
    assert_close,
    make_paged_batch,
)

FP8 = torch.float8_e4m3fn


def _randn(*shape: int, t: Target, gen: torch.Generator, dtype: torch.dtype | None = None) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen, dtype=torch.float32)
    return x.to(device=t.device, dtype=dtype or t.dtype)


def assert_linear_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Linear outputs: see the module docstring."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    top = float(ref.abs().max())
    if dtype == torch.float32:
        assert_close(out, ref, dtype, what, scale=max(top, 1.0))
        return
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    o, r = out.double(), ref.double()
    bad = (o - r).abs() > 2.0**-7 * r.abs() + 2e-3 * top
    err = float((o - r).abs().max())
    assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.numel()} off, max abs err {err:.3e}"


def fp8_abs_products(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``sum_k |xq[m, k] * wq[n, k]| * x_scale[m] * w_scale[n]`` (float64 ``[M, N]``): what an
    fp8 MMA's partial sums are truncated against."""
    xq, xs = qref.quantize_fp8_per_token(x.reshape(-1, x.shape[-1]))
    sums = xq.double().abs() @ w.double().abs().t()
    return (sums * xs.double() * w_scale.double()[None, :]).reshape(*x.shape[:-1], w.shape[0])


# Reduced-precision fp8 MMA accumulation (module docstring): relative to the sum of |products|.
FP8_MMA_ACC_REL = 2.0**-11


def assert_fp8_product_close(
    out: torch.Tensor, ref: torch.Tensor, abs_products: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """An fp8 linear computed on CUDA tensor cores: :func:`assert_linear_close`'s tolerance
    plus the fp8 MMA accumulator's (module docstring)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    o, r = out.double(), ref.double()
    top = float(ref.abs().max())
    base = 2e-5 * max(top, 1.0) + 2e-5 * r.abs() if dtype == torch.float32 else 2.0**-7 * r.abs() + 2e-3 * top
    acc = FP8_MMA_ACC_REL * abs_products.to(o.device)
    err = (o - r).abs()
    bad = err > base + acc
    worst = float((err / (acc + 1e-30)).max() * FP8_MMA_ACC_REL / 2.0**-12)
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} off, max abs err {float(err.max()):.3e} "
                           f"({worst:.2f} x 2^-12 of the sum of |products|)")


def assert_fp8_equal(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.dtype == ref.dtype == FP8, f"{what}: dtypes {got.dtype} {ref.dtype}"
    diff = got.view(torch.uint8) != ref.view(torch.uint8)
    assert not diff.any(), f"{what}: {int(diff.sum())}/{diff.numel()} e4m3 codes differ"


def assert_fp8_one_step(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """e4m3 values at most one e4m3 step apart (two roundings of nearly equal numbers)."""
    g, r = got.double(), ref.double()
    top = torch.maximum(g.abs(), r.abs())
    step = torch.exp2(torch.floor(torch.log2(top.clamp_min(2.0**-6))) - 3)  # 3 mantissa bits
    bad = (g - r).abs() > step
    assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.numel()} values more than one e4m3 step apart"


# ---------------------------------------------------------------------------------------
# FP8 linear
# ---------------------------------------------------------------------------------------


def _activations(m: int, k: int, t: Target, gen: torch.Generator) -> torch.Tensor:
    x = _randn(m, k, t=t, gen=gen) * 3
    if m > 2:
        x[1] *= 1e-3  # a row of small values: its own scale
    return x


def _fp8_weight(n: int, k: int, t: Target, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = _randn(n, k, t=t, gen=gen, dtype=torch.float32) * 0.05
    q, s = qref.quantize_fp8_rows(w)
    return q, s.reshape(-1)


def check_fp8_quantize(t: Target) -> None:
    gen = torch.Generator().manual_seed(11)
    for m, k in [(1, 64), (7, 300), (3, 5000), (4, 33)]:
        x = _activations(m, k, t, gen)
        if m > 3:
            x[3] = 0.0  # an all-zero row: the floored scale
        q, s = tops.quantize_fp8_per_token(x)
        rq, rs = qref.quantize_fp8_per_token(x)
        assert_fp8_equal(q, rq, f"quantize_fp8_per_token {m}x{k}")
        assert torch.equal(s, rs), f"quantize_fp8_per_token {m}x{k}: scales differ"


_LINEAR_SHAPES = [(1, 40, 96), (1, 64, 1100), (3, 33, 200), (16, 64, 128), (5, 48, 520)]


def check_fp8_gemv(t: Target) -> None:
    gen = torch.Generator().manual_seed(12)
    shapes = _LINEAR_SHAPES + ([(1, 4096, 4096), (8, 6144, 4096)] if t.big else [])
    for i, (m, n, k) in enumerate(shapes):
        x = _activations(m, k, t, gen)
        w, ws = _fp8_weight(n, k, t, gen)
        bias = _randn(n, t=t, gen=gen) if i % 2 else None
        got = tfp8.fp8_gemv(x, w, ws, bias)
        assert_linear_close(got, qref.fp8_linear(x, w, ws, bias), t.dtype, f"fp8_gemv {m}x{n}x{k}")


def check_fp8_gemm(t: Target) -> None:
    gen = torch.Generator().manual_seed(13)
    small = tfp8.Fp8LinearConfig(gemm_block_m=16, gemm_block_n=32, gemm_block_k=32, gemm_num_warps=4)
    configs = [small] + ([tfp8.Fp8LinearConfig()] if t.device == "cuda" else [])
    shapes = [(20, 48, 96), (37, 40, 160)] + ([(300, 1024, 4096)] if t.big else [])
    for cfg in configs:
        for i, (m, n, k) in enumerate(shapes):
            x = _activations(m, k, t, gen)
            w, ws = _fp8_weight(n, k, t, gen)
            bias = _randn(n, t=t, gen=gen) if i % 2 else None
            xq, xs = tops.quantize_fp8_per_token(x)
            got = tfp8.fp8_gemm(xq, xs, w, ws, bias, x.dtype, config=cfg)
            ref = qref.fp8_linear(x, w, ws, bias)
            what = f"fp8_gemm {m}x{n}x{k} {cfg}"
            if t.device == "cuda":  # tl.dot on the tensor cores
                assert_fp8_product_close(got, ref, fp8_abs_products(x, w, ws), t.dtype, what)
            else:
                assert_linear_close(got, ref, t.dtype, what)


def check_fp8_linear(t: Target) -> None:
    """The dispatching op on both sides of its threshold (on CUDA in bf16: torch._scaled_mm)."""
    gen = torch.Generator().manual_seed(14)
    x = _randn(2, 5, 96, t=t, gen=gen) * 2  # 3-D input, M = 10
    w, ws = _fp8_weight(48, 96, t, gen)
    bias = _randn(48, t=t, gen=gen)
    ref = qref.fp8_linear(x, w, ws, bias)
    for threshold in (16, 4):
        cfg = tfp8.Fp8LinearConfig(gemv_max_m=threshold, gemm_block_m=16, gemm_block_n=32, gemm_block_k=32,
                                   gemm_num_warps=4)
        got = tops.fp8_linear(x, w, ws, bias, config=cfg)
        what = f"fp8_linear gemv_max_m={threshold}"
        if t.device == "cuda" and x.numel() // x.shape[-1] > threshold:  # tensor cores: GEMM / _scaled_mm
            assert_fp8_product_close(got, ref, fp8_abs_products(x, w, ws), t.dtype, what)
        else:
            assert_linear_close(got, ref, t.dtype, what)
    no_bias = tops.fp8_linear(x, w, ws)
    _assert_fp8_linear_close(no_bias, qref.fp8_linear(x, w, ws), x, w, ws, t, "fp8_linear no bias")


def _assert_fp8_linear_close(got: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                             ws: torch.Tensor, t: Target, what: str) -> None:
    """``fp8_linear`` at its default dispatch against the W8A8 reference: above
    ``Fp8LinearConfig.gemv_max_m`` tokens on CUDA the products sum on the tensor cores (bounded
    per product, :func:`assert_fp8_product_close`), else exactly as the reference."""
    if t.device == "cuda" and x.numel() // x.shape[-1] > tfp8.Fp8LinearConfig().gemv_max_m:
        assert_fp8_product_close(got, ref, fp8_abs_products(x, w, ws), t.dtype, what)
    else:
        assert_linear_close(got, ref, t.dtype, what)


# ---------------------------------------------------------------------------------------
# WnA16
# ---------------------------------------------------------------------------------------

# (bits, group size, offsets, scale dtype)
_WNA16_CASES = [
    (4, 32, True, torch.float16),  # GGUF Q4_1
    (4, 128, False, torch.float16),  # GPTQ symmetric
    (4, 16, True, torch.float32),  # GGUF Q2_K
    (8, 32, False, torch.float16),  # GGUF Q8_0
    (8, 16, False, torch.float32),  # GGUF Q6_K
    (8, 64, True, torch.float32),  # GGUF Q5_K-like, group 64
]


def random_wna16(
    n: int, k: int, bits: int, group: int, offsets: bool, scale_dtype: torch.dtype, device: str,
    gen: torch.Generator,
) -> qref.WnA16Weight:
    """A random packed weight (values of every code, scales around 0.01, offsets around 0)."""
    g = k // group
    if bits == 4:
        qweight = qref.pack_int4(torch.randint(0, 16, (n, k), generator=gen))
    elif offsets:
        qweight = torch.randint(0, 256, (n, k), generator=gen).to(torch.uint8)
    else:
        qweight = torch.randint(-128, 128, (n, k), generator=gen).to(torch.int8)
    scales = (torch.rand(n, g, generator=gen) * 0.02 + 0.001).to(scale_dtype)
    offs = (torch.randn(n, g, generator=gen) * 0.05).to(scale_dtype) if offsets else None
    return qref.WnA16Weight(qweight, scales, offs, bits, group).to(device)


def assert_wna16_gemv_close(got: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: qref.WnA16Weight,
                            dtype: torch.dtype, what: str, roundings: int = 1) -> None:
    """The one-token WnA16 GEMV (gemv.gemv_wna16) multiplies by the float32 dequantized weight;
    the reference first rounds it to the activation dtype. On top of :func:`assert_linear_close`'s
    tolerance each output may differ by that rounding: ``u * sum_k |x_k w_k|``, ``u`` the
    dtype's unit roundoff (2^-8 bf16, 2^-11 fp16, 0 float32). ``roundings``: that many such
    roundings per product (the packed bf16 decode rounds each product and its four-term sums)."""
    u = roundings * {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(dtype, 0.0)
    if u == 0.0:
        assert_linear_close(got, ref, dtype, what)
        return
    wf = qref.dequantize_wna16(w.qweight, w.scales, w.offsets, w.bits, w.group_size)
    bound = u * (x.double().abs() @ wf.double().abs().t()) + 2.0**-7 * ref.double().abs()
    bound += 2e-3 * float(ref.abs().max())
    err = (got.double() - ref.double()).abs()
    assert not torch.isnan(got).any(), f"{what}: NaN in output"
    bad = err > bound
    assert not bad.any(), f"{what}: {int(bad.sum())}/{err.numel()} off, max abs err {float(err.max()):.3e}"


def _check_wna16(t: Target, seed: int, ms: list[int], shapes: list[tuple[int, int]], what: str,
                 config: twna16.WnA16Config | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i, (bits, group, offsets, sdt) in enumerate(_WNA16_CASES):
        for m in ms:
            for n, k in shapes:
                w = random_wna16(n, k, bits, group, offsets, sdt, t.device, gen)
                x = _randn(m, k, t=t, gen=gen)
                bias = _randn(n, t=t, gen=gen) if (i + m) % 2 else None
                args = (x, w.qweight, w.scales, w.offsets, w.bits, w.group_size, bias)
                got = twna16.wna16_linear(*args, config=config)
                ref = qref.wna16_linear(*args)
                case = f"{what} M={m} {n}x{k} bits={bits} g={group} off={offsets}"
                # gemv.gemv_wna16 at one token and per token up to gemv_max_m, the tensor-core GEMV
                # from 2 to MMA_GEMV_MAX_M (symmetric 4-bit, bf16 or float16 on CUDA): all multiply
                # by the unrounded weight.
                if m == 1 or m <= twna16.MMA_GEMV_MAX_M:
                    assert_wna16_gemv_close(got, ref, x, w, t.dtype, case)
                else:
                    assert_linear_close(got, ref, t.dtype, case)


def check_wna16_gemv(t: Target) -> None:
    shapes = [(40, 128), (33, 384)] + ([(4096, 4096), (1024, 14336)] if t.big else [])
    # On a card 11 tokens: the tensor-core GEMV in launches of 8 and 3 (wna16.mma_tokens).
    _check_wna16(t, 15, [1, 3, 16] + ([11] if t.big else []), shapes, "wna16 gemv")
    # Where the tensor-core GEMV does not apply, 2-16 tokens run the one-token GEMV per token up to
    # TOKEN_LOOP_MAX_M_* tokens and the GEMM above (the default, above); the multi-token GEMV
    # stays selectable.
    _check_wna16(t, 18, [3], shapes, "wna16 gemv multi-token", twna16.WnA16Config(gemv_token_loop=False))


def check_wna16_gemm(t: Target) -> None:
    shapes = [(40, 128), (24, 256)] + ([(4096, 4096)] if t.big else [])
    _check_wna16(t, 16, [17, 40] + ([300] if t.big else []), shapes, "wna16 gemm")
    # Split-K (2 ranges at these K; on a card the default splits the big shape's small M too).
    _check_wna16(t, 17, [17], shapes, "wna16 gemm split-K", twna16.WnA16Config(gemm_split_k=3))


# ---------------------------------------------------------------------------------------
# One-token GEMVs (kernels/triton_ops/gemv.py) and the fp8-quantizing norm / activation
# ---------------------------------------------------------------------------------------

# Tilings that cover one and several tiles per row, tiles past K, split-K (2 and 3 splits, the
# last one short) and rows past N.
_GEMV_TILES = [None, tgemv.GemvTiles(8, 64, 4, 1), tgemv.GemvTiles(4, 32, 2, 3),
               tgemv.GemvTiles(16, 128, 4, 2)]


def check_gemv16(t: Target) -> None:
    """``gemv16`` at several tilings, and the one-token op ``gemv16_linear`` at its own
    (:func:`~kernels.triton_ops.gemv.linear16_tiles`: one whole row per program up to 4,096
    inputs, 8 rows x 2,048 past it), against the float32 product."""
    gen = torch.Generator().manual_seed(21)
    shapes = [(40, 128), (33, 384), (9, 4608)]
    shapes += [(4096, 4096), (6144, 4096), (4096, 14336)] if t.big else []
    for i, (n, k) in enumerate(shapes):
        x = _randn(1, k, t=t, gen=gen)
        w = _randn(n, k, t=t, gen=gen) * 0.05
        bias = _randn(n, t=t, gen=gen) if i % 2 else None
        ref = (x.float() @ w.float().t() + (0 if bias is None else bias.float())).to(t.dtype)
        for tiles in _GEMV_TILES if (t.big or k < 1024) else [None]:
            got = tgemv.gemv16(x, w, bias, tiles=tiles)
            assert_linear_close(got, ref, t.dtype, f"gemv16 {n}x{k} {tiles}")
        got = tops.gemv16_linear(x.reshape(1, 1, k), w, bias)
        assert got.shape == (1, 1, n), got.shape
        what = f"gemv16_linear {n}x{k} {tgemv.linear16_tiles(k)}"
        assert_linear_close(got.reshape(1, n), ref, t.dtype, what)


def check_gemv_fp8(t: Target) -> None:
    """Pre-quantized activations, one and several tokens, against the W8A8 reference."""
    gen = torch.Generator().manual_seed(22)
    shapes = [(1, 40, 96), (1, 64, 1100), (3, 33, 200), (16, 64, 128), (5, 48, 520)]
    shapes += [(1, 4096, 4096), (4, 6144, 4096)] if t.big else []
    for i, (m, n, k) in enumerate(shapes):
        x = _activations(m, k, t, gen)
        w, ws = _fp8_weight(n, k, t, gen)
        bias = _randn(n, t=t, gen=gen) if i % 2 else None
        xq, xs = tops.quantize_fp8_per_token(x)
        ref = qref.fp8_linear(x, w, ws, bias)
        for tiles in _GEMV_TILES:
            got = tgemv.gemv_fp8(xq, xs, w, ws, bias, t.dtype, tiles=tiles)
            assert_linear_close(got, ref, t.dtype, f"gemv_fp8 {m}x{n}x{k} {tiles}")
        act = qref.Fp8Activation(xq, xs, t.dtype)  # fp8_linear on an activation quantized before it
        what = f"fp8_linear(Fp8Activation) {m}x{n}x{k}"
        _assert_fp8_linear_close(tops.fp8_linear(act, w, ws, bias), ref, x, w, ws, t, what)


def check_gemv_fp8_weight_only(t: Target) -> None:
    """fp8 weights on the unquantized activation (W8A16), one and several tokens, against
    ``x @ dequantize(w).T`` (quant_reference.fp8_weight_only_linear), also through the op."""
    gen = torch.Generator().manual_seed(23)
    shapes = [(1, 40, 96), (1, 64, 1100), (3, 33, 200), (16, 64, 128)]
    shapes += [(1, 4096, 4096), (1, 14336, 4096)] if t.big else []
    for i, (m, n, k) in enumerate(shapes):
        x = _activations(m, k, t, gen)
        w, ws = _fp8_weight(n, k, t, gen)
        bias = _randn(n, t=t, gen=gen) if i % 2 else None
        ref = qref.fp8_weight_only_linear(x, w, ws, bias)
        deq = (x.float() @ qref.dequantize_fp8(w, ws).t() + (0 if bias is None else bias.float())).to(t.dtype)
        assert_linear_close(ref, deq, t.dtype, f"reference fp8_weight_only_linear {m}x{n}x{k}")
        for tiles in _GEMV_TILES:
            got = tgemv.gemv_fp8_weight_only(x, w, ws, bias, tiles=tiles)
            assert_linear_close(got, ref, t.dtype, f"gemv_fp8_weight_only {m}x{n}x{k} {tiles}")
        got = tops.fp8_weight_only_linear(x.reshape(1, m, k), w, ws, bias)
        assert got.shape == (1, m, n), got.shape
        assert_linear_close(got.reshape(m, n), ref, t.dtype, f"fp8_weight_only_linear {m}x{n}x{k}")


def _fp8_block_weight(n: int, k: int, block: tuple[int, int], t: Target,
                      gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = _randn(n, k, t=t, gen=gen, dtype=torch.float32) * 0.05
    w[: block[0]] *= 8  # one block row of large weights: scales differ by block
    return qref.quantize_fp8_blocks(w, block)


def fp8_block_abs_products(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                           block: tuple[int, int]) -> torch.Tensor:
    """:func:`fp8_abs_products` with activations quantized per token group and block scales."""
    bn, bk = block
    k = x.shape[-1]
    xq, xs = qref.quantize_fp8_per_token_group(x.reshape(-1, k), bk)
    rows = qref.fp8_block_row_scales(ws, w.shape[0], bn).double()
    total = torch.zeros(xq.shape[0], w.shape[0], dtype=torch.float64, device=x.device)
    for j in range(k // bk):
        sl = slice(j * bk, (j + 1) * bk)
        sums = xq[:, sl].double().abs() @ w[:, sl].double().abs().t()
        total += sums * xs[:, j : j + 1].double() * rows[:, j]
    return total


# (tokens, rows, inputs, block): partial last row blocks, blocks smaller and larger than tiles.
_FP8_BLOCK_SHAPES = [(1, 96, 64, (16, 16)), (1, 100, 256, (32, 64)), (3, 72, 256, (32, 128)),
                     (16, 64, 128, (128, 128)), (1, 130, 512, (128, 128))]


def check_fp8_block_gemv(t: Target) -> None:
    """Block-wise fp8 weights on the unquantized activation (W8A16), one and several tokens and
    gated, against ``x @ dequantize_fp8_blocks(w).T`` (``quant_reference.fp8_block_weight_only_linear``)."""
    gen = torch.Generator().manual_seed(24)
    big = [(1, 4096, 4096, (128, 128)), (1, 28672, 4096, (128, 128))]
    shapes = _FP8_BLOCK_SHAPES + (big if t.big else [])
    for i, (m, n, k, block) in enumerate(shapes):
        x = _activations(m, k, t, gen)
        w, ws = _fp8_block_weight(n, k, block, t, gen)
        bias = _randn(n, t=t, gen=gen) if i % 2 else None
        ref = qref.fp8_block_weight_only_linear(x, w, ws, block, bias)
        deq = x.float() @ qref.dequantize_fp8_blocks(w, ws, block).t() + (0 if bias is None else bias.float())
        assert_linear_close(ref, deq.to(t.dtype), t.dtype, f"reference fp8_block weight-only {m}x{n}x{k}")
        for tiles in _GEMV_TILES:
            got = tops.fp8_block_weight_only_linear(x, w, ws, block, bias, tiles=tiles)
            assert_linear_close(got, ref, t.dtype, f"fp8_block weight-only {m}x{n}x{k} {block} {tiles}")
        if m == 1 and n % 2 == 0:
            for tiles in (None, tgemv.GemvTiles(4, 32, 2, 1)):
                got = tops.fp8_block_weight_only_gated_linear(x, w, ws, block, bias, tiles=tiles)
                unfused = tops.fp8_block_weight_only_linear(x, w, ws, block, bias,
                                                            tiles=tiles or tgemv.fp8_tiles(1, n, k))
                _assert_gated(got, unfused, f"fp8_block gated {n}x{k} {block} {tiles}")


def check_gather_columns(t: Target) -> None:
    """An act-order layer's input reorder: bit for bit ``index_select`` (one and several tokens,
    a permutation and a shorter index; with PDL on CUDA, as the decode chain launches it)."""
    gen = torch.Generator().manual_seed(26)
    for m, k, n in [(1, 4096, 4096), (7, 130, 130), (3, 2000, 1500)]:
        x = _randn(m, k, t=t, gen=gen)
        index = torch.randperm(k, generator=gen)[:n].to(t.device)
        for pdl in (False, True) if t.device == "cuda" else (False,):
            got = tops.gather_columns(x, index, pdl=pdl)
            assert torch.equal(got, x.index_select(-1, index)), f"gather_columns {m}x{k} -> {n} pdl={pdl}"
    x3 = _randn(2, 3, 64, t=t, gen=gen)
    index = torch.randperm(64, generator=gen).to(t.device)
    assert torch.equal(tops.gather_columns(x3, index), x3.index_select(-1, index)), "gather_columns 3-D"


def check_fp8_block_gemm(t: Target) -> None:
    """Block-wise W8A8 (activations per token in groups of block_k) against its reference; the
    per-token-group quantization bit for bit. On CUDA the products sum on the tensor cores."""
    gen = torch.Generator().manual_seed(25)
    shapes = [(5, 48, 64, (16, 32)), (20, 72, 256, (32, 64)), (37, 130, 256, (128, 128)),
              (70, 64, 384, (64, 128))]
    # On a Hopper card, in bf16: torch._scaled_mm at K = 4,096 and 512; K = 256 and 1,280 (K / 128
    # not a multiple of 4, where cuBLASLt returned garbage) must take the Triton GEMM.
    shapes += [(300, 1024, 4096, (128, 128)), (16, 6144, 4096, (128, 128)), (7, 256, 512, (128, 128)),
               (7, 256, 256, (128, 128)), (64, 1024, 1280, (128, 128))] if t.big else []
    for i, (m, n, k, block) in enumerate(shapes):
        x = _activations(m, k, t, gen)
        w, ws = _fp8_block_weight(n, k, block, t, gen)
        bias = _randn(n, t=t, gen=gen) if i % 2 else None
        got_q, got_s = tblock.quantize_fp8_per_token_group(x, block[1])
        want_q, want_s = qref.quantize_fp8_per_token_group(x, block[1])
        assert_fp8_equal(got_q, want_q, f"per-token-group quantization {m}x{k} / {block[1]}")
        assert torch.equal(got_s, want_s), f"per-token-group scales {m}x{k} / {block[1]}"
        ref = qref.fp8_block_linear(x, w, ws, block, bias)
        for use_scaled_mm in (True, False):  # torch._scaled_mm where it applies, the Triton GEMM
            got = tops.fp8_block_linear(x, w, ws, block, bias, use_scaled_mm=use_scaled_mm)
            what = f"fp8_block_linear {m}x{n}x{k} {block} scaled_mm={use_scaled_mm}"
            if t.device == "cuda":
                assert_fp8_product_close(got, ref, fp8_block_abs_products(x, w, ws, block), t.dtype, what)
            else:
                assert_linear_close(got, ref, t.dtype, what)


def check_gemv_wna16(t: Target) -> None:
    """Every WnA16 case (4/8-bit, groups 16-128, offsets, int8), scales per weight or per group;
    4-bit weights through the int32-word kernel and the byte kernel. The tilings cover both of
    the word kernel's forms: whole tiles (no masks) and masked tiles (rows past N, tiles past K,
    split-K)."""
    gen = torch.Generator().manual_seed(23)
    shapes = [(40, 128), (33, 384)] + ([(4096, 4096), (1024, 14336)] if t.big else [])
    for i, (bits, group, offsets, sdt) in enumerate(_WNA16_CASES):
        for n, k in shapes:
            w = random_wna16(n, k, bits, group, offsets, sdt, t.device, gen)
            x = _randn(1, k, t=t, gen=gen)
            bias = _randn(n, t=t, gen=gen) if i % 2 else None
            args = (x, w.qweight, w.scales, w.offsets, w.bits, w.group_size, bias)
            ref = qref.wna16_linear(*args)
            # 4-bit: the int32-word kernel (the default) and the byte kernel factored and not.
            # (factored, byte kernel):
            variants = [(True, True), (True, False)] + ([(False, True)] if bits == 4 else [])
            for tiles in _GEMV_TILES:
                for factored, byte_kernel in variants:
                    got = tgemv.gemv_wna16(*args, tiles=tiles, factored=factored, words=not byte_kernel)
                    what = (f"gemv_wna16 {n}x{k} bits={bits} g={group} off={offsets} {tiles} "
                            f"fact={factored} words={not byte_kernel}")
                    assert_wna16_gemv_close(got, ref, x, w, t.dtype, what)
                    if bits == 4 and not byte_kernel:  # the first tile peeled: the same sums
                        peeled = tgemv.gemv_wna16(*args, tiles=tiles, factored=factored, peel=True)
                        assert torch.equal(peeled, got), f"{what} peel: {(peeled - got).abs().max()}"
                        split = tiles is not None and tiles.split_k > 1
                        if split and (t.device != "cpu" or tiles == _GEMV_TILES[2]):  # CPU: one tiling
                            _check_split_fixup(args, tiles, got, what)
                        if t.device != "cpu":  # inputs, scales and offsets read in PTX: the same sums
                            xl = tgemv.gemv_wna16(*args, tiles=tiles, factored=factored, xload=True)
                            assert torch.equal(xl, got), f"{what} xload: {(xl - got).abs().max()}"
                if bits == 4 and not offsets and t.dtype != torch.float32 and t.device != "cpu":
                    # The packed 16-bit decode (CUDA): products and four-term sums rounded to the
                    # inputs' dtype (float16: of a sixteenth of each product).
                    got = tgemv.gemv_wna16(*args, tiles=tiles, pairs=True)
                    what = f"gemv_wna16 pairs {n}x{k} g={group} {tiles}"
                    assert_wna16_gemv_close(got, ref, x, w, t.dtype, what, roundings=4)
                    peeled = tgemv.gemv_wna16(*args, tiles=tiles, pairs=True, peel=True)
                    assert torch.equal(peeled, got), f"{what} peel: {(peeled - got).abs().max()}"
                    # Inputs and scales read in PTX: the same sums.
                    for flags in ({"xload": True}, {"xload": True, "peel": True}):
                        other = tgemv.gemv_wna16(*args, tiles=tiles, pairs=True, **flags)
                        assert torch.equal(other, got), f"{what} {flags}: {(other - got).abs().max()}"
                        if n % 2 == 0 and (tiles is None or tiles.split_k == 1):  # gated GEMVs: one split
                            gated = tgemv.gemv_wna16(*args, tiles=tiles, pairs=True, gated=True, **flags)
                            unfused = tgemv.gemv_wna16(*args, tiles=tiles, pairs=True, gated=True)
                            assert torch.equal(gated, unfused), f"{what} gated {flags}"


def _check_split_fixup(args: tuple[Any, ...], tiles: tgemv.GemvTiles, want: torch.Tensor, what: str) -> None:
    """The word kernel's split-K added by its last program per row block (``counters``) gives the
    second launch's bits and leaves every count 0, launch after launch (on a card: with xload,
    and many launches, where programs of one row block finish in every order)."""
    x, n = args[0], args[1].shape[0]
    counters = tgemv.split_counters(n, tiles, x.device)
    cuda = ({"xload": True, "pairs": True}, {"xload": True, "pairs": True, "peel": True})
    for flags in ({}, {"peel": True}) + (cuda if x.is_cuda else ()):
        ref = want if "pairs" not in flags else tgemv.gemv_wna16(*args, tiles=tiles, pairs=True)
        for launch in range(50 if x.is_cuda else 1):
            got = tgemv.gemv_wna16(*args, tiles=tiles, counters=counters, **flags)
            assert torch.equal(got, ref), f"{what} fixup {flags} launch {launch}: {(got - ref).abs().max()}"
        assert not counters.any(), f"{what} fixup {flags}: counts left {counters.tolist()}"


# Gated tilings: one split, whole gate/up pairs (block_n >= 2): the default, the fp8 one-token
# tiling (one output per program), several tiles per row with outputs past N / 2.
_GATED_TILES = [None, tgemv.FP8_M1_TILES, tgemv.GemvTiles(8, 64, 4, 1), tgemv.GemvTiles(4, 32, 2, 1)]


def _assert_gated(got: torch.Tensor, unfused: torch.Tensor, what: str) -> None:
    """The fused SiLU-and-mul equals the GEMV followed by the activation kernel, bit for bit."""
    want = tops.silu_and_mul(unfused)
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    assert torch.equal(got, want), f"{what}: max |diff| {(got.float() - want.float()).abs().max().item()}"


def check_gemv_gated(t: Target) -> None:
    """``gated=True`` of the one-token GEMVs (gemv16, fp8 weight-only, 4-bit words and the byte
    layout's two-op fallback) against the unfused GEMV + ``silu_and_mul`` with the same tiling
    (bitwise) and against the torch reference of both (4-bit: the unfused GEMV against its
    reference, with check_gemv_wna16's bound); a tiling that cannot pair gate and up rows
    (split-K, one row per program) is refused."""
    gen = torch.Generator().manual_seed(24)
    shapes = [(37, 128), (48, 384)] + ([(14336, 4096)] if t.big else [])  # (outputs, K)
    for i, (d, k) in enumerate(shapes):
        x = _randn(1, k, t=t, gen=gen)
        bias = _randn(2 * d, t=t, gen=gen) if i % 2 else None
        w16 = _randn(2 * d, k, t=t, gen=gen) * 0.05
        ref16 = reference.silu_and_mul((x.float() @ w16.float().t() + (0 if bias is None else bias.float()))
                                       .to(t.dtype))
        w8, ws = _fp8_weight(2 * d, k, t, gen)
        ref8 = reference.silu_and_mul(qref.fp8_weight_only_linear(x, w8, ws, bias))
        w4 = random_wna16(2 * d, k, 4, 64, i % 2 == 1, torch.float16, t.device, gen)
        args4 = (x, w4.qweight, w4.scales, w4.offsets, w4.bits, w4.group_size, bias)
        ref4 = qref.wna16_linear(*args4)
        for tiles in [*_GATED_TILES, tgemv.linear16_tiles(k, gated=True)]:  # the last: the 16-bit op's
            what = f"{d}x{k} {tiles}"
            got = tgemv.gemv16(x, w16, bias, tiles=tiles, gated=True)
            _assert_gated(got, tgemv.gemv16(x, w16, bias, tiles=tiles), f"gemv16 gated {what}")
            assert_close(got, ref16, t.dtype, f"gemv16 gated vs reference {what}")
            got = tgemv.gemv_fp8_weight_only(x, w8, ws, bias, tiles=tiles, gated=True)
            _assert_gated(got, tgemv.gemv_fp8_weight_only(x, w8, ws, bias, tiles=tiles),
                          f"gemv_fp8_weight_only gated {what}")
            assert_close(got, ref8, t.dtype, f"gemv_fp8_weight_only gated vs reference {what}")
            for words in (True, False):
                # Against the reference through the unfused GEMV (check_gemv_wna16's bound: the
                # reference rounds each weight to the activation dtype, the GEMV does not).
                unfused = tgemv.gemv_wna16(*args4, tiles=tiles, words=words)
                got = tgemv.gemv_wna16(*args4, tiles=tiles, words=words, gated=True)
                _assert_gated(got, unfused, f"gemv_wna16 gated words={words} {what}")
                assert_wna16_gemv_close(unfused, ref4, x, w4, t.dtype, f"gemv_wna16 words={words} {what}")
    x, w16 = _randn(1, 64, t=t, gen=gen), _randn(8, 64, t=t, gen=gen)
    for tiles in (tgemv.GemvTiles(8, 16, 4, 2), tgemv.GemvTiles(1, 64, 4, 1)):
        try:
            tgemv.gemv16(x, w16, tiles=tiles, gated=True)
        except ValueError as exc:
            assert "gated GEMV needs" in str(exc), exc
        else:
            raise AssertionError(f"gated GEMV with {tiles} was not refused")


def _rope_case(t: Target, gen: torch.Generator, hq: int, hk: int, d: int) -> tuple[torch.Tensor, ...]:
    """A position, a cos/sin table of ``d`` columns and two empty caches of 4 blocks of 8 slots."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(64, dtype=torch.float32), inv)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(t.device)
    caches = [torch.zeros(4, 8, hk, d, dtype=t.dtype, device=t.device) for _ in range(4)]
    pos = torch.randint(0, 64, (1,), generator=gen).to(t.device)
    return (pos, cos_sin, *caches)


def _unfused_rope(y: torch.Tensor, pos: torch.Tensor, cos_sin: torch.Tensor, key_cache: torch.Tensor,
                  value_cache: torch.Tensor, slot: torch.Tensor, hq: int, hk: int, d: int) -> torch.Tensor:
    """The plain path after a GEMV's ``[q; k; v]`` output ``y``: ``rotary_store_kvcache``, which
    stores k and v into the caches; returns the rotated q ``[1, hq, d]``."""
    q = y[:, :hq * d].reshape(1, hq, d).clone()
    tops.rotary_store_kvcache(pos, q, y[:, hq * d:(hq + hk) * d].reshape(1, hk, d),
                              y[:, (hq + hk) * d:].reshape(1, hk, d), cos_sin, key_cache, value_cache, slot)
    return q


def _assert_rope_matches(t: Target, gen: torch.Generator, gemv: Callable[..., torch.Tensor],
                         hq: int, hk: int, d: int, slot_value: int, what: str) -> None:
    """``gemv(rope=None)`` then ``rotary_store_kvcache`` against ``gemv(rope=...)``: bit for bit
    the rotated q and both whole caches (a negative slot: nothing stored)."""
    pos, cos_sin, k1, v1, k2, v2 = _rope_case(t, gen, hq, hk, d)
    slot = torch.tensor([slot_value], device=t.device)
    q = _unfused_rope(gemv(rope=None), pos, cos_sin, k1, v1, slot, hq, hk, d)
    got = gemv(rope=RopeStore(pos, cos_sin, k2, v2, slot, hq, hk, d))
    assert got.shape == (1, hq * d) and torch.equal(got.reshape(1, hq, d), q), f"q {what}"
    assert torch.equal(k2, k1) and torch.equal(v2, v1), f"caches {what}"
    assert (k2.abs().sum() > 0) == (slot_value >= 0), f"store {what}"


def check_gemv_rope(t: Target) -> None:
    """Rotary + K/V store in the epilogue of the one-token GEMVs (4-bit words, 16-bit and fp8
    weight-only; ``rope=...``) against the same GEMV at the same tiling followed by
    ``rotary_store_kvcache``, bit for bit: the rotated q, the whole key and value caches (one slot
    written, the rest untouched), with and without bias (4-bit: and offsets), at several tilings
    (pairs of one head split over programs, several heads per program); a negative slot stores
    nothing. The ops (``wna16_rope_linear``, ``gemv16_rope_linear``,
    ``fp8_weight_only_rope_linear``) take the same path as the engine's one-token GEMV (4-bit and
    fp8: the same bits as it, then ``rotary_store_kvcache``) or return None where the kernel does
    not apply (two tokens, a split tiling), and a rope that does not fit the weight is refused."""
    gen = torch.Generator().manual_seed(31)
    cases = [(4, 2, 16, 128, False), (2, 1, 32, 256, True)] + ([(32, 8, 128, 4096, False)] if t.big else [])
    for hq, hk, d, k, with_offsets in cases:
        n = (hq + 2 * hk) * d
        x = _randn(1, k, t=t, gen=gen)
        w = random_wna16(n, k, 4, 64, with_offsets, torch.float16, t.device, gen)
        w16 = _randn(n, k, t=t, gen=gen) * 0.05
        w8, ws = _fp8_weight(n, k, t, gen)
        for bias in (None, _randn(n, t=t, gen=gen)):
            for tiles in (tgemv.GemvTiles(2, 64, 2, 1), tgemv.GemvTiles(8, 128, 4, 1),
                          tgemv.GemvTiles(64, 64, 4, 1)):
                gemvs = {
                    "w4": functools.partial(tgemv.gemv_wna16, x, w.qweight, w.scales, w.offsets, 4, 64, bias,
                                            tiles=tiles),
                    "16-bit": functools.partial(tgemv.gemv16, x, w16, bias, tiles=tiles),
                    "fp8": functools.partial(tgemv.gemv_fp8_weight_only, x, w8, ws, bias, tiles=tiles),
                }
                for name, gemv in gemvs.items():
                    for slot_value in (13, -1) if bias is None and tiles.block_n == 2 else (13,):
                        what = f"{name} {hq}/{hk}x{d} K={k} {tiles} bias={bias is not None} slot={slot_value}"
                        _assert_rope_matches(t, gen, gemv, hq, hk, d, slot_value, what)
        # The ops against the engine's one-token GEMVs (4-bit: its tiling, packed decode, PTX
        # loads; fp8: fp8_tiles), then rotary_store_kvcache; 16-bit at the op's own tiling.
        ops = {
            "wna16_rope_linear": (functools.partial(twna16.wna16_rope_linear, x, w.qweight, w.scales,
                                                    w.offsets, 4, 64, None),
                                  twna16.one_token_gemv(x, w.qweight, w.scales, w.offsets, 4, 64, None,
                                                        pdl=False)),
            "fp8_weight_only_rope_linear": (
                functools.partial(tfp8.fp8_weight_only_rope_linear, x, w8, ws, None),
                tfp8.fp8_weight_only_linear(x, w8, ws)),
            "gemv16_rope_linear": (functools.partial(tgemv.gemv16_rope_linear, x, w16, None),
                                   tgemv.gemv16(x, w16, tiles=tgemv.linear16_tiles(k, gated=True))),
        }
        for name, (op, y) in ops.items():
            pos, cos_sin, k1, v1, k2, v2 = _rope_case(t, gen, hq, hk, d)
            rope = RopeStore(pos, cos_sin, k2, v2, torch.tensor([5], device=t.device), hq, hk, d)
            via_op = op(rope)
            q = _unfused_rope(y, pos, cos_sin, k1, v1, rope.slot_mapping, hq, hk, d)
            assert via_op is not None and torch.equal(via_op.reshape(1, hq, d), q), f"{name} q"
            assert torch.equal(k2, k1) and torch.equal(v2, v1), f"{name} caches"
        two = torch.cat([x, x])
        assert twna16.wna16_rope_linear(two, w.qweight, w.scales, w.offsets, 4, 64, None, rope) is None, \
            "two tokens must fall back (4-bit)"
        assert tgemv.gemv16_rope_linear(two, w16, None, rope) is None, "two tokens must fall back (16-bit)"
        assert tfp8.fp8_weight_only_rope_linear(two, w8, ws, None, rope) is None, \
            "two tokens must fall back (fp8)"
    saved = twna16.M1_SHAPE_TILES
    twna16.M1_SHAPE_TILES = {(n, k): tgemv.GemvTiles(8, 64, 4, 2)}
    try:
        assert twna16.wna16_rope_linear(x, w.qweight, w.scales, w.offsets, 4, 64, None, rope) is None, \
            "a split tiling must fall back"
    finally:
        twna16.M1_SHAPE_TILES = saved
    wrong = RopeStore(pos, cos_sin, k2, v2, rope.slot_mapping, hq + 1, hk, d)
    try:
        tgemv.gemv_wna16(x, w.qweight, w.scales, w.offsets, 4, 64, rope=wrong)
    except ValueError as exc:
        assert "rope needs" in str(exc), exc
    else:
        raise AssertionError("a rope for another head count was not refused")


def _assert_same_fp8(got: qref.Fp8Activation, want: qref.Fp8Activation, what: str) -> None:
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.q.shape == want.q.shape and got.scale.shape == want.scale.shape, f"{what}: shapes"
    assert_fp8_equal(got.q, want.q, what)
    assert torch.equal(got.scale, want.scale), f"{what}: scales differ"


def check_fused_fp8_quant(t: Target) -> None:
    """rms_norm_fp8, fused_add_rms_norm_fp8, silu_and_mul_fp8: bit for bit the kernel's own
    16-bit op then the per-token quantization. (Against the reference ops the norm kernel sums
    squares in its own order: its 16-bit output, checked in kernel_checks.py, may differ in the
    last bit, and then so may a code.)"""
    gen = torch.Generator().manual_seed(24)
    for rows, h in [(1, 64), (3, 100), (2, 4096), (5, 33)]:
        x = _randn(rows, h, t=t, gen=gen) * 3
        res = _randn(rows, h, t=t, gen=gen)
        w = (torch.rand(h, generator=gen) + 0.5).to(device=t.device, dtype=t.dtype)
        _assert_same_fp8(tops.rms_norm_fp8(x, w, 1e-5), qref.Fp8Activation.of(tops.rms_norm(x, w, 1e-5)),
                         f"rms_norm_fp8 {rows}x{h}")
        got, summed = tops.fused_add_rms_norm_fp8(x.clone(), res.clone(), w, 1e-5)
        out, want_sum = tops.fused_add_rms_norm(x.clone(), res.clone(), w, 1e-5)
        _assert_same_fp8(got, qref.Fp8Activation.of(out), f"fused_add_rms_norm_fp8 {rows}x{h}")
        assert torch.equal(summed, want_sum), f"fused_add_rms_norm_fp8 {rows}x{h}: residual sum"
    for rows, d in [(1, 40), (3, 300), (1, 20000), (2, 1000)]:
        x = _randn(rows, 2 * d, t=t, gen=gen) * 2
        _assert_same_fp8(tops.silu_and_mul_fp8(x), qref.Fp8Activation.of(tops.silu_and_mul(x)),
                         f"silu_and_mul_fp8 {rows}x{d}")
    x3 = _randn(2, 3, 64, t=t, gen=gen)
    w3 = torch.ones(64, device=t.device, dtype=t.dtype)
    want = qref.Fp8Activation.of(tops.rms_norm(x3, w3, 1e-6))
    _assert_same_fp8(tops.rms_norm_fp8(x3, w3, 1e-6), want, "3-D")


# ---------------------------------------------------------------------------------------
# FP8 KV cache
# ---------------------------------------------------------------------------------------


def _kv_scales(hk: int, per_head: bool, t: Target, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales that make the random K/V use most of e4m3's range (and saturate a few values)."""
    n = hk if per_head else 1
    k_scale = (torch.rand(n, generator=gen) * 0.004 + 0.006).to(t.device)
    v_scale = (torch.rand(n, generator=gen) * 0.004 + 0.006).to(t.device)
    return k_scale, v_scale


def _fp8_cache(n: int, bs: int, hk: int, d: int, t: Target, gen: torch.Generator) -> torch.Tensor:
    """Old cache contents: random e4m3 codes (finite)."""
    x = torch.randn(n, bs, hk, d, generator=gen) * 100
    return x.clamp(-448, 448).to(FP8).to(t.device)


def check_store_kvcache_fp8(t: Target) -> None:
    gen = torch.Generator().manual_seed(17)
    for (bs, d, hk), per_head in [((8, 64, 1), False), ((16, 128, 2), True), ((32, 64, 3), True)]:
        num_tokens, num_blocks = 37, 6
        kv = _randn(num_tokens, 2 * hk + 1, d, t=t, gen=gen)
        key, value = kv[:, :hk], kv[:, hk : 2 * hk]
        slots = torch.randperm(num_blocks * bs, generator=gen)[:num_tokens]
        slots[torch.randperm(num_tokens, generator=gen)[:5]] = -1
        slots = slots.to(t.device)
        ks, vs = _kv_scales(hk, per_head, t, gen)
        caches = [_fp8_cache(num_blocks, bs, hk, d, t, gen) for _ in range(2)]
        refs = [c.clone() for c in caches]
        tops.store_kvcache(key, value, *caches, slots, k_scale=ks, v_scale=vs)
        reference.store_kvcache(key, value, *refs, slots, k_scale=ks, v_scale=vs)
        what = f"store_kvcache fp8 bs={bs} d={d} hk={hk} per_head={per_head}"
        assert_fp8_equal(caches[0], refs[0], f"{what} key")
        assert_fp8_equal(caches[1], refs[1], f"{what} value")


def check_rotary_store_kvcache_fp8(t: Target) -> None:
    gen = torch.Generator().manual_seed(18)
    for d, hk, g, bs, num_tokens, per_head in [(64, 2, 1, 8, 37, True), (128, 2, 4, 16, 13, False),
                                               (64, 3, 8, 16, 9, True)]:
        what = f"rotary_store_kvcache fp8 d={d} hk={hk} g={g} per_head={per_head}"
        max_pos, num_blocks = 4096, -(-num_tokens // bs) + 4
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
        cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(t.device)
        positions = torch.randint(0, max_pos, (num_tokens,), generator=gen).to(t.device)
        slots = _store_slots(num_tokens, bs, num_blocks, gen).to(t.device)
        q, k, v = _fused_qkv_views(num_tokens, hk * g, hk, d, t, gen)
        ks, vs = _kv_scales(hk, per_head, t, gen)
        caches = [_fp8_cache(num_blocks, bs, hk, d, t, gen) for _ in range(2)]
        two = [c.clone() for c in caches]
        ref = [c.clone() for c in caches]
        two_q, two_k = tops.rotary_embedding(positions, q.clone(), k.clone(), cos_sin)
        tops.store_kvcache(two_k, v, *two, slots, k_scale=ks, v_scale=vs)
        scales = {"k_scale": ks, "v_scale": vs}
        reference.rotary_store_kvcache(positions, q.clone(), k, v, cos_sin, *ref, slots, **scales)
        got_q = tops.rotary_store_kvcache(positions, q, k, v, cos_sin, *caches, slots, **scales)
        assert torch.equal(got_q, two_q), f"{what}: q differs from the rotary kernel's"
        assert_fp8_equal(caches[0], two[0], f"{what}: key cache vs rotary + store")
        assert_fp8_equal(caches[1], ref[1], f"{what}: value cache")
        assert_fp8_one_step(caches[0], ref[0], f"{what}: key cache vs reference")


def fp8_paged_batch(
    specs: list[tuple[int, int]], hk: int, g: int, d: int, bs: int, per_head: bool, t: Target,
    gen: torch.Generator, slack: int = 0,
) -> tuple[PagedBatch, torch.Tensor, torch.Tensor]:
    """A paged batch whose caches are quantized to e4m3 with scales from their own values;
    returns ``(batch, k_scale, v_scale)``."""
    b = make_paged_batch(specs, hk, g, d, bs, t, gen, seq_len_slack=slack)
    ks = qref.fp8_kv_scale(b.key_cache.reshape(-1, hk, d), per_head)
    vs = qref.fp8_kv_scale(b.value_cache.reshape(-1, hk, d), per_head)
    kc = qref.quantize_fp8_with_scale(b.key_cache, ks.reshape(-1, 1))
    vc = qref.quantize_fp8_with_scale(b.value_cache, vs.reshape(-1, 1))
    return dataclasses.replace(b, key_cache=kc, value_cache=vc), ks, vs


_FP8_ATTN = [((16, 128, 4, 2), True), ((8, 64, 1, 3), False), ((32, 64, 8, 1), True)]


def check_paged_attention_fp8(t: Target) -> None:
    gen = torch.Generator().manual_seed(19)
    for (bs, d, g, hk), per_head in _FP8_ATTN:
        specs = [(2 * bs + 3, bs + 5), (1, 1), (bs + 1, 1), (2 * bs - 1, 2 * bs - 1), (17, 9)]
        if t.big:
            specs += [(1000, 1000), (777, 300)]
        b, ks, vs = fp8_paged_batch(specs, hk, g, d, bs, per_head, t, gen)
        args = (b.q, b.key_cache, b.value_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                b.scale, b.max_query_len, b.max_seq_len)
        got = tops.paged_attention(*args, k_scale=ks, v_scale=vs)
        ref = reference.paged_attention(*args, k_scale=ks, v_scale=vs)
        assert_close(got, ref, t.dtype, f"paged_attention fp8 bs={bs} d={d} g={g} per_head={per_head}")


def check_paged_decode_attention_fp8(t: Target) -> None:
    gen = torch.Generator().manual_seed(20)
    configs = [tops.DecodeConfig(), tops.DecodeConfig(partition_size=32, block_n=16),
               tops.DecodeConfig(partition_size=32, block_n=16, heads_per_program=2)]
    # + four KV heads at head dim 64: two per program by default, each row with its own scale.
    for (bs, d, g, hk), per_head in _FP8_ATTN + [((16, 64, 2, 4), True), ((16, 64, 2, 4), False)]:
        lens = [1, bs + 1, 2 * bs + 3, 7, 5 * bs - 1] + ([2048, 513] if t.big else [])
        for cfg in configs:
            b, ks, vs = fp8_paged_batch([(n, 1) for n in lens], hk, g, d, bs, per_head, t, gen, slack=37)
            args = (b.q, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, b.scale, b.max_seq_len)
            got = tops.paged_decode_attention(*args, k_scale=ks, v_scale=vs, config=cfg)
            ref = reference.paged_decode_attention(*args, k_scale=ks, v_scale=vs)
            assert_close(got, ref, t.dtype, f"paged_decode_attention fp8 bs={bs} d={d} g={g} {cfg}")


def check_gemv_int4_mma(t: Target) -> None:
    """The tensor-core 4-bit GEMV (``wna16_mma``) against the torch reference with
    :func:`assert_wna16_gemv_close`'s bound: 1, 3 and 8 tokens, groups of 128 and of a whole row,
    whole and partial loop iterations (3 blocks of 128 over 2 x 2 warp-blocks), bias, float16
    and float32 scales, both ways of subtracting 136, with and without the peeled first iteration;
    gated, bit for bit the product followed by the activation kernel; asymmetric weights
    (offsets). On CUDA the assembly, which takes bf16 and float16 inputs (float32: ``mma_applies``
    refuses them); on the CPU the assembly path's own loads with its Triton model
    (``mode="model"``, bf16 inputs) and the direct sums (``mode="sums"``, this target's dtype).
    The assembly is checked lane by lane in ``test_wna16_mma.py``."""
    on_gpu = t.device != "cpu"
    if on_gpu and t.dtype == torch.float32:
        x = torch.zeros(1, 256, device=t.device, dtype=t.dtype)
        assert not tmma.mma_applies(x, torch.zeros(32, 128, dtype=torch.uint8, device=t.device), None, 4, 128)
        return
    gen = torch.Generator().manual_seed(31)
    shapes = [(32, 256, 128), (48, 384, 128), (32, 256, 256)]
    big = [(6144, 4096, 128), (4096, 14336, 128), (28672, 4096, 128)] if t.big else []
    for i, (n, k, group) in enumerate(shapes + big):
        sdt = (torch.float16, torch.float32)[i % 2]
        w = random_wna16(n, k, 4, group, False, sdt, t.device, gen)
        tilings = [None, tmma.MmaTiles(4, 2, sub_mma=False), tmma.MmaTiles(8, 1, prefetch=False)]
        if (n, k, group) not in big:
            tilings += [tmma.MmaTiles(1, 1), tmma.MmaTiles(2, 2), tmma.MmaTiles(2, 1, prefetch=False)]
        for m in (1, 3, 8):
            x0 = _randn(m, k, t=t, gen=gen)
            bias = _randn(n, t=t, gen=gen) if m == 3 else None
            for mode in ["asm"] if on_gpu else ["sums", "model"]:
                x = x0.to(torch.bfloat16) if mode == "model" else x0
                ref = qref.wna16_linear(x, w.qweight, w.scales, None, 4, group, bias)
                if on_gpu:
                    assert tmma.mma_applies(x, w.qweight, None, 4, group)
                for tiles in tilings:
                    what = f"gemv_int4_mma {mode} {n}x{k} g={group} m={m} scales={sdt} {tiles}"
                    got = tmma.gemv_int4_mma(x, w.qweight, w.scales, group, bias, tiles=tiles, mode=mode)
                    assert_wna16_gemv_close(got, ref, x, w, x.dtype, what)
                    gated = tmma.gemv_int4_mma(x, w.qweight, w.scales, group, bias, tiles=tiles, mode=mode,
                                               gated=True)
                    _assert_gated(gated, got, what + " gated")
        # Asymmetric weights (offsets: q * scale + offset), two tilings.
        wa = random_wna16(n, k, 4, group, True, sdt, t.device, gen)
        for m in (1, 3, 8) if on_gpu else (1, 3):
            x0 = _randn(m, k, t=t, gen=gen)
            for mode in ["asm"] if on_gpu else ["sums", "model"]:
                x = x0.to(torch.bfloat16) if mode == "model" else x0
                ref = qref.wna16_linear(x, wa.qweight, wa.scales, wa.offsets, 4, group, None)
                if on_gpu:
                    assert tmma.mma_applies(x, wa.qweight, wa.offsets, 4, group, wa.scales)
                for tiles in tilings[:2] if on_gpu else tilings[1:2]:
                    what = f"gemv_int4_mma offsets {mode} {n}x{k} g={group} m={m} scales={sdt} {tiles}"
                    got = tmma.gemv_int4_mma(x, wa.qweight, wa.scales, group, tiles=tiles, mode=mode,
                                             offsets=wa.offsets)
                    assert_wna16_gemv_close(got, ref, x, wa, x.dtype, what)


CHECKS: dict[str, Callable[[Target], None]] = {
    "fp8_quantize": check_fp8_quantize,
    "fp8_gemv": check_fp8_gemv,
    "fp8_gemm": check_fp8_gemm,
    "fp8_linear": check_fp8_linear,
    "wna16_gemv": check_wna16_gemv,
    "wna16_gemm": check_wna16_gemm,
    "gemv16": check_gemv16,
    "gemv_fp8": check_gemv_fp8,
    "gemv_fp8_weight_only": check_gemv_fp8_weight_only,
    "fp8_block_gemv": check_fp8_block_gemv,
    "fp8_block_gemm": check_fp8_block_gemm,
    "gather_columns": check_gather_columns,
    "gemv_wna16": check_gemv_wna16,
    "gemv_gated": check_gemv_gated,
    "gemv_rope": check_gemv_rope,
    "gemv_int4_mma": check_gemv_int4_mma,
    "fused_fp8_quant": check_fused_fp8_quant,
    "store_kvcache_fp8": check_store_kvcache_fp8,
    "rotary_store_kvcache_fp8": check_rotary_store_kvcache_fp8,
    "paged_attention_fp8": check_paged_attention_fp8,
    "paged_decode_attention_fp8": check_paged_decode_attention_fp8,
}


def run_all(t: Target, names: list[str] | None = None) -> dict[str, str]:
    """Run the checks ``names`` (default: all); ``{name: "ok" | traceback}``."""
    results: dict[str, str] = {}
    for name in names or list(CHECKS):
        try:
            CHECKS[name](t)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent test, per check
            results[name] = traceback.format_exc()
    return results


if __name__ == "__main__":
    # python -m tests.kernels.quant_kernel_checks [DTYPE [CHECK ...]] (default float32, all)
    dtype = getattr(torch, sys.argv[1]) if len(sys.argv) > 1 else torch.float32
    print(json.dumps(run_all(Target("cpu", dtype), sys.argv[2:] or None)))
