"""GPTQ -> WnA16: weights packed as AutoGPTQ/optimum pack them, converted, dequantized through our
layout, compared with the GPTQ formula (bit for bit) and with the weight that was packed."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.model_executor.layers.quantization.gptq_format import (
    GptqConfig,
    act_order,
    convert_gptq,
    dequantize_gptq,
    permute_inputs,
)
from kernels.quant_reference import dequantize_wna16
from tests.helpers.quantized_checkpoints import autogptq_pack


def _grid_weight(
    n: int, k: int, group_size: int, bits: int, sym: bool, gen: torch.Generator, zero_min: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random weight on a GPTQ grid: ``(weight, q, scales, zeros)``."""
    groups = k // group_size
    maxq = (1 << bits) - 1
    q = torch.randint(0, maxq + 1, (n, k), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.002).half()
    if sym:
        zeros = torch.full((groups, n), 1 << (bits - 1))
    else:
        zeros = torch.randint(zero_min, maxq + 1, (groups, n), generator=gen)
    g = torch.arange(k) // group_size
    weight = scales.float()[g].t() * (q - zeros[g].t()).float()
    return weight, q, scales, zeros


@pytest.mark.parametrize(
    ("bits", "group_size", "sym", "fmt"),
    [(4, 128, True, "gptq"), (4, 32, False, "gptq"), (4, 64, False, "gptq_v2"), (8, 32, True, "gptq"),
     (8, 128, False, "gptq"), (4, -1, False, "gptq")],
)
def test_gptq_round_trip(bits: int, group_size: int, sym: bool, fmt: str) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + group_size)
    n, k = 48, 256
    gs = k if group_size == -1 else group_size
    # v1 cannot store a zero point of 0 (next test); v2 can.
    weight, _, scales, zeros = _grid_weight(n, k, gs, bits, sym, gen, zero_min=0 if fmt == "gptq_v2" else 1)
    packed = autogptq_pack(weight, scales, zeros, gs, bits, v1=fmt == "gptq")
    config = GptqConfig(bits=bits, group_size=group_size, sym=sym, checkpoint_format=fmt)
    w = convert_gptq(*packed, config)
    assert (w.out_features, w.in_features, w.bits, w.group_size) == (n, k, bits, gs)
    assert (w.offsets is None) == sym  # symmetric checkpoints need no offsets
    # The kernels' layout: row-major scales, offsets with the scales' strides (one group per
    # row too, where a transposed [1, N] keeps stride N on its size-1 dimension: a GPU failure).
    groups = w.scales.shape[1]
    assert w.scales.stride() == (groups, 1)
    assert w.offsets is None or w.offsets.stride() == (groups, 1)
    ours = dequantize_wna16(w.qweight, w.scales, w.offsets, w.bits, w.group_size)
    assert torch.equal(ours, dequantize_gptq(*packed, config))  # the GPTQ formula, bit for bit
    assert torch.equal(ours, weight)  # and the weight that was packed


def test_gptq_v1_zero_of_zero_reads_back_as_sixteen() -> None:
    """AutoGPTQ packs a zero point of 0 as -1 (all ones): its kernels then read 15 + 1 = 16 for
    that field and the fields above it in the word. We convert to what those kernels compute."""
    gen = torch.Generator().manual_seed(7)
    n, k, gs = 16, 64, 32
    weight, _, scales, zeros = _grid_weight(n, k, gs, 4, False, gen)
    zeros[0, 3] = 0
    packed = autogptq_pack(weight, scales, zeros, gs, 4, v1=True)
    config = GptqConfig(bits=4, group_size=gs, sym=False)
    w = convert_gptq(*packed, config)
    ours = dequantize_wna16(w.qweight, w.scales, w.offsets, 4, gs)
    assert torch.equal(ours, dequantize_gptq(*packed, config))
    assert not torch.equal(ours[3, :gs], weight[3, :gs])  # the packer's corruption, reproduced
    assert torch.equal(ours[:3], weight[:3]) and torch.equal(ours[:, gs:], weight[:, gs:])


def test_gptq_config_from_hf_and_refusals() -> None:
    cfg = GptqConfig.from_hf({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                              "sym": False, "checkpoint_format": "gptq"})
    assert cfg == GptqConfig(bits=4, group_size=128, sym=False)
    with pytest.raises(ValueError):
        GptqConfig.from_hf({"quant_method": "awq"})
    with pytest.raises(ValueError):
        GptqConfig(bits=3)
    gen = torch.Generator().manual_seed(8)
    weight, _, scales, zeros = _grid_weight(16, 64, 32, 4, True, gen)
    qweight, qzeros, scales16, g_idx = autogptq_pack(weight, scales, zeros, 32, 4)
    act_order_g_idx = g_idx[torch.randperm(64, generator=gen)]
    with pytest.raises(ValueError, match="act-order"):  # reordered first (next test), not here
        convert_gptq(qweight, qzeros, scales16, act_order_g_idx, GptqConfig(bits=4, group_size=32))


@pytest.mark.parametrize(("bits", "sym"), [(4, True), (4, False), (8, False)])
def test_act_order_weights_reordered_by_their_groups(bits: int, sym: bool) -> None:
    """desc_act: group ``g`` is the inputs ``perm[g * gs:(g + 1) * gs]``. After ``permute_inputs``
    our weight's column ``i`` is the checkpoint's input ``act_order(g_idx)[i]``, bit for bit, and
    the product with ``x[..., perm]`` is the layer's."""
    gen = torch.Generator().manual_seed(bits)
    n, k, gs = 24, 128, 32
    weight_in_order, _, scales, zeros = _grid_weight(n, k, gs, bits, sym, gen)
    perm = torch.randperm(k, generator=gen)
    weight = torch.empty_like(weight_in_order)
    weight[:, perm] = weight_in_order  # input perm[i] sits in group i // gs
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = torch.arange(k, dtype=torch.int32) // gs
    qweight, qzeros, scales16, g_idx = autogptq_pack(weight, scales, zeros, gs, bits, g_idx=g_idx)
    config = GptqConfig(bits=bits, group_size=gs, sym=sym)
    assert torch.equal(dequantize_gptq(qweight, qzeros, scales16, g_idx, config), weight)
    order = act_order(g_idx, gs)
    assert order is not None and torch.equal(g_idx[order].long(), torch.arange(k) // gs)
    w = convert_gptq(permute_inputs(qweight, order, bits), qzeros, scales16, None, config)
    ours = dequantize_wna16(w.qweight, w.scales, w.offsets, w.bits, w.group_size)
    assert torch.equal(ours, weight[:, order])
    x = torch.randn(3, k, generator=gen)
    torch.testing.assert_close(x[:, order] @ ours.t(), x @ weight.t())
    assert act_order(torch.arange(k) // gs, gs) is None  # contiguous groups: nothing to reorder
    with pytest.raises(ValueError, match="every group"):
        act_order(torch.zeros(k, dtype=torch.int32).index_fill_(0, torch.tensor([0]), 1), gs)
