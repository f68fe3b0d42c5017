"""The quantized references (kernels/quant_reference.py and the fp8 KV cache of
kernels/reference.py) against independent float64 math, on the CPU."""

from __future__ import annotations

import pytest
import torch

from kernels import quant_reference as qref
from kernels import reference

FP8 = torch.float8_e4m3fn


def _e4m3_step(v: torch.Tensor) -> torch.Tensor:
    """Spacing of e4m3 values around ``|v|`` (2^-9 below the normal range)."""
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(2.0**-6))) - 3)


def test_quantize_fp8_rows_rounds_to_nearest_and_maps_the_max_to_448() -> None:
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.tensor([1e-4, 1e-2, 1, 10, 300, 1e4])[:, None]
    x = (torch.randn(6, 257, generator=gen, dtype=torch.float64) * magnitudes).float()
    q, scale = qref.quantize_fp8_rows(x)
    assert q.dtype == FP8 and scale.shape == (6, 1) and scale.dtype == torch.float32
    amax = x.double().abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(scale.double(), amax / 448, rtol=1e-7, atol=0)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((6,), 448.0))
    # Round to nearest: each value within half an e4m3 step of x / scale.
    y = x.double() / scale.double()
    assert bool(((q.double() - y).abs() <= _e4m3_step(y) / 2 + 1e-9 * y.abs()).all())


def test_quantize_fp8_rows_zero_row_gets_a_finite_scale() -> None:
    q, scale = qref.quantize_fp8_rows(torch.zeros(2, 16))
    assert bool((q.float() == 0).all()) and bool(torch.isfinite(scale).all()) and bool((scale > 0).all())


def test_fp8_linear_reference_is_exact_products_then_scales() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 64, generator=gen)
    w_fp8, w_scale = qref.quantize_fp8_rows(torch.randn(24, 64, generator=gen) * 0.1)
    bias = torch.randn(24, generator=gen)
    got = qref.fp8_linear(x, w_fp8, w_scale.view(-1), bias)
    xq, xs = qref.quantize_fp8_per_token(x.reshape(-1, 64))
    want = (xq.double() @ w_fp8.double().t()) * xs.double() * w_scale.double().view(1, -1) + bias.double()
    assert got.shape == (3, 4, 24)
    torch.testing.assert_close(got.reshape(-1, 24).double(), want, rtol=1e-6, atol=1e-5)
    # ... and the fp8 linear is close to the unquantized one (e4m3: ~2^-4 relative per element).
    exact = x @ qref.dequantize_fp8(w_fp8, w_scale.view(-1)).t() + bias
    assert float((got - exact).norm() / exact.norm()) < 0.05


def test_wna16_pack_unpack_round_trip_and_dequantize() -> None:
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (5, 64), generator=gen)
    packed = qref.pack_int4(q)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # even k in the low nibble
    assert torch.equal(qref.unpack_int4(packed), q.to(torch.uint8))
    scales = torch.rand(5, 2, generator=gen).half()
    offsets = torch.randn(5, 2, generator=gen)
    w = qref.dequantize_wna16(packed, scales, offsets, 4, 32)
    g = torch.arange(64) // 32
    want = q.float() * scales.float()[:, g] + offsets[:, g]
    assert torch.equal(w, want)
    sym = qref.dequantize_wna16(packed, scales, None, 4, 32)
    assert torch.equal(sym, (q.float() - 8) * scales.float()[:, g])
    q8 = torch.randint(-128, 128, (5, 64), generator=gen).to(torch.int8)
    assert torch.equal(qref.dequantize_wna16(q8, scales, None, 8, 32), q8.float() * scales.float()[:, g])


def test_wna16_linear_reference_rounds_the_weight_to_the_activation_dtype() -> None:
    gen = torch.Generator().manual_seed(3)
    packed = qref.pack_int4(torch.randint(0, 16, (8, 32), generator=gen))
    scales = torch.rand(8, 1, generator=gen) * 0.1
    x = torch.randn(2, 32, generator=gen).bfloat16()
    got = qref.wna16_linear(x, packed, scales, None, 4, 32)
    w16 = qref.dequantize_wna16(packed, scales, None, 4, 32).bfloat16()
    assert torch.equal(got, (x.double() @ w16.double().t()).bfloat16())


def test_wnA16_weight_validates_and_moves_rows_exactly() -> None:
    gen = torch.Generator().manual_seed(4)
    q = qref.pack_int4(torch.randint(0, 16, (6, 64), generator=gen))
    w = qref.WnA16Weight(q, torch.rand(6, 2).half(), torch.randn(6, 2).half(), 4, 32)
    assert (w.out_features, w.in_features, w.nbytes) == (6, 64, 6 * 32 + 2 * 6 * 2 * 2)
    idx = torch.tensor([5, 0, 3])
    sub = w.select_rows(idx)
    full = qref.dequantize_wna16(w.qweight, w.scales, w.offsets, 4, 32)
    assert torch.equal(qref.dequantize_wna16(sub.qweight, sub.scales, sub.offsets, 4, 32), full[idx])
    other = qref.WnA16Weight(q[:2], torch.rand(2, 2), torch.randn(2, 2), 4, 32)  # float32 scales
    both = qref.concat_rows([w, other])
    assert both.scales.dtype == torch.float32 and both.out_features == 8
    with pytest.raises(ValueError):
        qref.WnA16Weight(q, torch.rand(6, 3), None, 4, 32)  # wrong number of groups
    with pytest.raises(ValueError):
        # 8-bit without offsets must be signed
        qref.WnA16Weight(torch.zeros(6, 64, dtype=torch.uint8), torch.rand(6, 2), None, 8, 32)
    with pytest.raises(ValueError):
        qref.WnA16Weight(q, torch.rand(6, 8), None, 4, 8)  # group below 16


@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_kv_cache_reference_stores_codes_and_attends_close_to_16bit(per_head: bool) -> None:
    """Store K/V in an fp8 cache and in a float32 one; the attention outputs differ only by
    e4m3 rounding of K and V. Unit-variance data: the first query rows see a few keys, so
    their output is close to a single V row and carries its rounding (half an e4m3 step,
    up to 0.125 at |v| in [2, 4)); measured max abs error 0.10, mean 0.007. Bounds: 0.2, 0.01."""
    gen = torch.Generator().manual_seed(5)
    num_blocks, bs, hk, d, g = 8, 16, 2, 64, 4
    seq_len = 100
    k = torch.randn(seq_len, hk, d, generator=gen)
    v = torch.randn(seq_len, hk, d, generator=gen)
    q = torch.randn(seq_len, hk * g, d, generator=gen)
    slots = torch.arange(seq_len)
    k_scale, v_scale = qref.fp8_kv_scale(k, per_head), qref.fp8_kv_scale(v, per_head)
    assert k_scale.shape == ((hk,) if per_head else (1,))
    caches8 = [torch.zeros(num_blocks, bs, hk, d, dtype=FP8) for _ in range(2)]
    caches32 = [torch.zeros(num_blocks, bs, hk, d) for _ in range(2)]
    reference.store_kvcache(k, v, *caches8, slots, k_scale=k_scale, v_scale=v_scale)
    reference.store_kvcache(k, v, *caches32, slots)
    stored = caches8[0].view(-1, hk, d)[:seq_len]
    want = qref.quantize_fp8_with_scale(k, k_scale.view(-1, 1))
    assert torch.equal(stored.view(torch.uint8), want.view(torch.uint8))
    with pytest.raises(ValueError):
        reference.store_kvcache(k, v, *caches8, slots)  # fp8 without scales
    table = torch.tensor([[0, 1, 2, 3, 4, 5, 6]], dtype=torch.int32)
    lens = torch.tensor([seq_len], dtype=torch.int32)
    args = (table, torch.tensor([0, seq_len], dtype=torch.int32), lens, d**-0.5, seq_len, seq_len)
    out8 = reference.paged_attention(q, *caches8, *args, k_scale=k_scale, v_scale=v_scale)
    out32 = reference.paged_attention(q, *caches32, *args)
    err = (out8 - out32).abs()
    print(f"fp8 KV attention vs float32 KV (per_head={per_head}): max abs err {float(err.max()):.4f}, "
          f"mean {float(err.mean()):.5f}")
    assert 0 < float(err.max()) < 0.2 and float(err.mean()) < 0.01


def test_planned_attention_stores_and_reads_fp8_like_the_unplanned_ops() -> None:
    """The CPU engine's planned path (store + attend in one call) on an fp8 cache equals
    store_kvcache followed by paged_attention."""
    gen = torch.Generator().manual_seed(6)
    num_blocks, bs, hk, d, g, seq_len = 4, 8, 2, 32, 2, 20
    k, v = torch.randn(seq_len, hk, d, generator=gen), torch.randn(seq_len, hk, d, generator=gen)
    q = torch.randn(seq_len, hk * g, d, generator=gen)
    slots = torch.arange(seq_len)
    scales = {"k_scale": qref.fp8_kv_scale(k, True), "v_scale": qref.fp8_kv_scale(v, True)}
    table = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    starts, lens = torch.tensor([0, seq_len], dtype=torch.int32), torch.tensor([seq_len], dtype=torch.int32)
    planned = [torch.zeros(num_blocks, bs, hk, d, dtype=FP8) for _ in range(2)]
    plan = reference.plan_paged_attention(slots, table, starts, lens, bs, seq_len, seq_len)
    got = reference.paged_attention_with_plan(q, k, v, *planned, plan, d**-0.5, **scales)
    two = [torch.zeros(num_blocks, bs, hk, d, dtype=FP8) for _ in range(2)]
    reference.store_kvcache(k, v, *two, slots, **scales)
    want = reference.paged_attention(q, *two, table, starts, lens, d**-0.5, seq_len, seq_len, **scales)
    assert torch.equal(planned[0].view(torch.uint8), two[0].view(torch.uint8))
    assert torch.equal(planned[1].view(torch.uint8), two[1].view(torch.uint8))
    assert torch.equal(got, want)
