"""The quantized kernels on a CUDA GPU: every check of ``quant_kernel_checks.py`` in bf16, fp16
and float32 with larger shapes (llama3-8b projections), the ``torch._scaled_mm`` path, the fp8
GEMM's accumulator promotion, and fp8 KV-cache attention against bf16 KV-cache attention
(errors printed: run with ``-s``).

One command: ``python -m pytest -q -s tests/kernels/test_quant_ops_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels import quant_reference as qref  # noqa: E402
from kernels import triton_ops as tops  # noqa: E402
from kernels.triton_ops.fp8_matmul import fp8_gemm  # noqa: E402
from tests.kernels import quant_kernel_checks as checks  # noqa: E402
from tests.kernels.kernel_checks import Target, make_paged_batch  # noqa: E402


def _fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
@pytest.mark.parametrize("check", sorted(checks.CHECKS))
def test_quant_kernel_matches_reference_gpu(check: str, dtype: torch.dtype) -> None:
    if "fp8" in check and not _fp8_capable():
        pytest.skip("fp8 needs compute capability >= 8.9")
    checks.CHECKS[check](Target("cuda", dtype, big=True))


@pytest.mark.gpu
@pytest.mark.parametrize("use_scaled_mm", [True, False], ids=["scaled_mm", "triton"])
def test_fp8_linear_llama_shapes_gpu(use_scaled_mm: bool) -> None:
    """Prefill-sized fp8 linears on the llama3-8b projections, both large-M paths."""
    if not _fp8_capable():
        pytest.skip("fp8 needs compute capability >= 8.9")
    gen = torch.Generator().manual_seed(30)
    config = tops.Fp8LinearConfig(use_scaled_mm=use_scaled_mm)
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
        x = torch.randn(256, k, generator=gen).to("cuda", torch.bfloat16)
        w, ws = qref.quantize_fp8_rows(torch.randn(n, k, generator=gen).cuda() * 0.02)
        got = tops.fp8_linear(x, w, ws.view(-1), config=config)
        ref = qref.fp8_linear(x, w, ws.view(-1))
        err = float((got.float() - ref.float()).abs().max())
        path = "scaled_mm" if use_scaled_mm else "triton"
        top = float(ref.abs().max())
        print(f"fp8_linear M=256 N={n} K={k} {path}: max abs err {err:.3e} (|ref| max {top:.2f})")
        abs_products = checks.fp8_abs_products(x, w, ws.view(-1))
        checks.assert_fp8_product_close(got, ref, abs_products, torch.bfloat16, f"fp8_linear {n}x{k}")


@pytest.mark.gpu
def test_fp8_gemm_accumulator_promotion_gpu() -> None:
    """The Triton GEMM in float32 against the reference whose sums are exact float32: with its
    partial sums promoted to float32 every 128 products (the default) and with Triton's sm_90
    default (never promoted), errors printed relative to 2^-12 of the sum of |products|, the
    scale of the fp8 MMA's truncation (docs/QUANTIZATION.md). The promoted kernel stays within
    the tests' bound, and its largest error is no larger than the unpromoted one's."""
    if not _fp8_capable():
        pytest.skip("fp8 needs compute capability >= 8.9")
    gen = torch.Generator().manual_seed(32)
    for m, n, k in [(20, 48, 96), (300, 1024, 4096), (256, 4096, 14336)]:
        x = (torch.randn(m, k, generator=gen) * 3).cuda()
        w, ws = qref.quantize_fp8_rows(torch.randn(n, k, generator=gen).cuda() * 0.05)
        ws = ws.view(-1)
        xq, xs = tops.quantize_fp8_per_token(x)
        ref = qref.fp8_linear(x, w, ws)
        abs_products = checks.fp8_abs_products(x, w, ws)
        errors = {}
        for label, imprecise in (("promoted every 128", 128), ("never promoted", None)):
            cfg = tops.Fp8LinearConfig(gemm_max_imprecise_acc=imprecise)
            got = fp8_gemm(xq, xs, w, ws, None, torch.float32, config=cfg)
            err = (got.double() - ref.double()).abs()
            errors[label] = float(err.max())
            rel = float((err / (2.0**-12 * abs_products.to(err.device) + 1e-30)).max())
            print(f"fp8_gemm float32 {m}x{n}x{k} {label}: max abs err {errors[label]:.3e} "
                  f"({rel:.2f} x 2^-12 of the sum of |products|)")
            if imprecise is not None:
                what = f"fp8_gemm {m}x{n}x{k}"
                checks.assert_fp8_product_close(got, ref, abs_products, torch.float32, what)
        assert errors["promoted every 128"] <= errors["never promoted"]


@pytest.mark.gpu
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_tensor"])
def test_fp8_kv_attention_vs_bf16_kv_gpu(per_head: bool) -> None:
    """The same K/V in a bf16 cache and in an fp8 one (scales from the data), llama3-8b heads:
    the attention outputs differ by the e4m3 rounding of K and V. Bounds as for the CPU
    reference (tests/kernels/test_quant_reference.py): max abs error < 0.2, mean < 0.01."""
    if not _fp8_capable():
        pytest.skip("fp8 needs compute capability >= 8.9")
    gen = torch.Generator().manual_seed(31)
    t = Target("cuda", torch.bfloat16)
    hk, g, d, bs = 8, 4, 128, 16
    for kind, specs in [("decode", [(n, 1) for n in (1, 17, 500, 2048, 4000)]),
                        ("prefill", [(1024, 1024), (777, 300), (2 * bs + 3, bs + 5)])]:
        b = make_paged_batch(specs, hk, g, d, bs, t, gen)
        ks = qref.fp8_kv_scale(b.key_cache.reshape(-1, hk, d), per_head)
        vs = qref.fp8_kv_scale(b.value_cache.reshape(-1, hk, d), per_head)
        k8 = qref.quantize_fp8_with_scale(b.key_cache, ks.reshape(-1, 1))
        v8 = qref.quantize_fp8_with_scale(b.value_cache, vs.reshape(-1, 1))
        if kind == "decode":
            common = (b.block_tables, b.seq_lens, b.scale, b.max_seq_len)
            out16 = tops.paged_decode_attention(b.q, b.key_cache, b.value_cache, *common)
            out8 = tops.paged_decode_attention(b.q, k8, v8, *common, k_scale=ks, v_scale=vs)
        else:
            common = (b.block_tables, b.query_start_loc, b.seq_lens, b.scale, b.max_query_len, b.max_seq_len)
            out16 = tops.paged_attention(b.q, b.key_cache, b.value_cache, *common)
            out8 = tops.paged_attention(b.q, k8, v8, *common, k_scale=ks, v_scale=vs)
        err = (out8.float() - out16.float()).abs()
        print(f"fp8 KV vs bf16 KV {kind} (per_head={per_head}): max abs err {float(err.max()):.4f}, "
              f"mean {float(err.mean()):.5f}")
        assert float(err.max()) < 0.2 and float(err.mean()) < 0.01


@pytest.mark.gpu
def test_fp8_support_is_detected_gpu() -> None:
    from gpu_worker.model_executor.layers.quantization.fp8_format import fp8_supported, require_fp8

    assert fp8_supported("cuda") == _fp8_capable()
    if _fp8_capable():
        require_fp8("cuda")
    else:
        with pytest.raises(RuntimeError, match="compute capability"):
            require_fp8("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("offsets", [False, True], ids=["symmetric", "offsets"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_gemv_wna16_nibble_ptx_is_bit_for_bit_the_triton_decode_gpu(offsets: bool, gated: bool) -> None:
    """The 4-bit word GEMV's inline-PTX nibble decode (``nibble_asm``, the CUDA default) gives
    the same bits as the Triton-op decode that the CPU interpreter runs, on llama3-8b's gate_up
    (gated: its [gate; up] with SiLU-and-mul) and o shapes."""
    from kernels.triton_ops.gemv import GemvTiles, gemv_wna16

    gen = torch.Generator().manual_seed(7)
    for n, k in ((28672, 4096), (4096, 4096)):
        q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8).cuda()
        s = (torch.rand(n, k // 128, generator=gen) * 0.02 + 0.001).half().cuda()
        o = (torch.randn(n, k // 128, generator=gen) * 0.01).half().cuda() if offsets else None
        x = torch.randn(1, k, generator=gen).to("cuda", torch.bfloat16)
        tiles = GemvTiles(8, 2048, 4, 1)
        a = gemv_wna16(x, q, s, o, 4, 128, tiles=tiles, gated=gated, nibble_asm=True)
        b = gemv_wna16(x, q, s, o, 4, 128, tiles=tiles, gated=gated, nibble_asm=False)
        assert torch.equal(a, b), (n, k, (a.float() - b.float()).abs().max())


@pytest.mark.gpu
def test_gemv_wna16_packed_bf16_pairs_gpu() -> None:
    """The packed bf16 decode (``pairs``) on llama3-8b's gate_up and o shapes: within four bf16
    roundings per product of the float32 product of the dequantized weight (its own stated
    error), and its gated form bit-for-bit its GEMV followed by ``silu_and_mul``."""
    from kernels.quant_reference import dequantize_wna16
    from kernels.triton_ops.activation import silu_and_mul
    from kernels.triton_ops.gemv import GemvTiles, gemv_wna16

    gen = torch.Generator().manual_seed(11)
    tiles = GemvTiles(8, 2048, 4, 1)
    for n, k in ((28672, 4096), (4096, 4096)):
        q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8).cuda()
        s = (torch.rand(n, k // 128, generator=gen) * 0.02 + 0.001).half().cuda()
        x = torch.randn(1, k, generator=gen).to("cuda", torch.bfloat16)
        got = gemv_wna16(x, q, s, None, 4, 128, tiles=tiles, pairs=True)
        w = dequantize_wna16(q, s, None, 4, 128).double()
        exact = x.double() @ w.t()
        scale = x.double().abs() @ w.abs().t()
        err = (got.double() - exact).abs()
        assert float((err / scale).max()) < 4 * 2.0**-8, float((err / scale).max())
        word = gemv_wna16(x, q, s, None, 4, 128, tiles=tiles)  # the float32 decode, for the record
        print(f"{n}x{k}: pairs max err / sum|xw| {float((err / scale).max()):.2e}, "
              f"float32 decode {float(((word.double() - exact).abs() / scale).max()):.2e}")
        gated = gemv_wna16(x, q, s, None, 4, 128, tiles=tiles, gated=True, pairs=True)
        assert torch.equal(gated, silu_and_mul(got)), (n, k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gemv_wna16_dp4a_gpu(dtype: torch.dtype) -> None:
    """The integer decode (``dp4a``: each thread's two words of bf16 or float16 inputs as 16-bit
    fixed point under their largest magnitude, ``dp4a`` on the nibbles) on llama3-8b's shapes,
    plain inputs and inputs with one channel in 64 a hundred times larger: within ``2^-15`` of
    each 16-input block's largest ``|x|`` times its ``sum |w|`` (the fixed point's rounding) plus
    the rounding of the output, of the float64 product of the dequantized weight; its gated form
    bit for bit its GEMV followed by ``silu_and_mul``; tiles with one word per thread ignore it
    (the packed 16-bit decode's bits)."""
    from kernels.quant_reference import dequantize_wna16
    from kernels.triton_ops.activation import silu_and_mul
    from kernels.triton_ops.gemv import GemvTiles, gemv_wna16

    gen = torch.Generator().manual_seed(12)
    for n, k, tiles in ((28672, 4096, GemvTiles(8, 2048, 4, 1)), (6144, 4096, GemvTiles(4, 2048, 4, 1)),
                        (4096, 4096, GemvTiles(8, 4096, 8, 1)), (4096, 14336, GemvTiles(8, 2048, 4, 1))):
        q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8).cuda()
        s = (torch.rand(n, k // 128, generator=gen) * 0.02 + 0.001).half().cuda()
        w = dequantize_wna16(q, s, None, 4, 128).double()
        base = torch.randn(1, k, generator=gen)
        for outliers in (False, True):
            big = 1 + 99 * (torch.arange(k) % 64 == 0)
            x = (base * big if outliers else base).to("cuda", dtype)
            got = gemv_wna16(x, q, s, None, 4, 128, tiles=tiles, pairs=True, xload=True, dp4a=True)
            exact = x.double() @ w.t()
            block_max = x.double().abs().view(1, k // 16, 16).amax(-1).repeat_interleave(16, -1)
            u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # the output's rounding
            bound = 2.0**-15 * (block_max @ w.abs().t()) + u * exact.abs()
            bound += 2.0**-20 * (x.double().abs() @ w.abs().t())
            err = (got.double() - exact).abs()
            assert bool((err <= bound).all()), (n, k, outliers, float((err / bound).max()))
            pairs = gemv_wna16(x, q, s, None, 4, 128, tiles=tiles, pairs=True, xload=True)
            scale = x.double().abs() @ w.abs().t()
            pairs_err = float(((pairs.double() - exact).abs() / scale).max())
            print(f"{dtype} {n}x{k} outliers={outliers}: dp4a max err / sum|xw| "
                  f"{float((err / scale).max()):.2e}, pairs {pairs_err:.2e}")
            peeled = gemv_wna16(x, q, s, None, 4, 128, tiles=tiles, pairs=True, xload=True, peel=True,
                                dp4a=True)
            assert torch.equal(peeled, got), (n, k, "peel")
            if n == 28672:
                gated = gemv_wna16(x, q, s, None, 4, 128, tiles=tiles, gated=True, pairs=True, xload=True,
                                   dp4a=True)
                assert torch.equal(gated, silu_and_mul(got)), (n, k, "gated")
        one_word = GemvTiles(8, 2048, 8, 1)  # one word per thread: the packed bf16 decode
        a = gemv_wna16(x, q, s, None, 4, 128, tiles=one_word, pairs=True, xload=True, dp4a=True)
        assert torch.equal(a, gemv_wna16(x, q, s, None, 4, 128, tiles=one_word, pairs=True, xload=True))
