"""compressed-tensors integer weights (``pack-quantized``) -> our WnA16 layout: exact against
compressed-tensors' own formula, its packing as its ``pack_to_int32`` documents it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from gpu_worker.model_executor.layers.quantization.ct_int_format import (
    CtIntConfig,
    convert_ct_int,
    ct_slice,
    dequantize_ct,
    is_ct_int,
    pack_ct,
    unpack_ct,
)
from gpu_worker.model_executor.layers.quantization.gptq_format import act_order
from kernels.quant_reference import dequantize_wna16


def documented_pack(signed: np.ndarray, bits: int, packed_dim: int) -> np.ndarray:
    """compressed-tensors' packing, step by step as its documentation states it: shift to
    unsigned by ``2^(bits - 1)``, then value ``i`` of each run of ``32 / bits`` along
    ``packed_dim`` into bits ``bits * i`` of one word."""
    unsigned = (signed.astype(np.int64) + (1 << (bits - 1))).astype(np.uint32)
    if packed_dim == 0:
        unsigned = unsigned.T
    per_word = 32 // bits
    packed = np.zeros((unsigned.shape[0], unsigned.shape[1] // per_word), dtype=np.uint32)
    for i in range(per_word):
        packed |= unsigned[:, i::per_word] << np.uint32(bits * i)
    packed = packed.view(np.int32)
    return packed if packed_dim == 1 else np.ascontiguousarray(packed.T)


@pytest.mark.parametrize(("bits", "dim"), [(4, 1), (4, 0), (8, 1), (8, 0)])
def test_packing_is_compressed_tensors(bits: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(bits + dim)
    half = 1 << (bits - 1)
    signed = torch.randint(-half, half, (16, 32), generator=gen)
    want = torch.from_numpy(documented_pack(signed.numpy(), bits, dim))
    got = pack_ct(signed + half, bits, dim)
    assert torch.equal(got, want)
    assert torch.equal(unpack_ct(got, bits, dim), signed + half)


def _layer(bits: int, n: int, k: int, group: int, symmetric: bool, gen: torch.Generator,
           scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """A random compressed-tensors linear: its tensors and its config."""
    half = 1 << (bits - 1)
    groups = k // group
    q = torch.randint(-half, half, (n, k), generator=gen)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).to(scale_dtype)
    zeros = torch.randint(-half, half, (n, groups), generator=gen)
    zp = None if symmetric else pack_ct(zeros + half, bits, 0)
    config = CtIntConfig(bits=bits, group_size=-1 if groups == 1 else group, symmetric=symmetric)
    return {"packed": pack_ct(q + half, bits), "scales": scales, "zp": zp, "config": config}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 128])  # 128 = K: strategy channel, one group per row
def test_convert_is_exact(bits: int, symmetric: bool, group: int) -> None:
    gen = torch.Generator().manual_seed(bits * 7 + group + symmetric)
    n, k = 48, 128
    layer = _layer(bits, n, k, group, symmetric, gen)
    w = convert_ct_int(layer["packed"], layer["scales"], layer["zp"], layer["config"])
    assert (w.offsets is None) == symmetric and w.bits == bits and w.group_size == group
    assert w.scales.dtype == torch.float16  # these bfloat16 scales are float16 exactly
    got = dequantize_wna16(w.qweight, w.scales, w.offsets, w.bits, w.group_size)
    want = dequantize_ct(layer["packed"], layer["scales"], layer["zp"], None, layer["config"])
    assert torch.equal(got, want)


def test_scales_that_float16_cannot_hold_stay_float32() -> None:
    gen = torch.Generator().manual_seed(5)
    layer = _layer(4, 16, 64, 32, True, gen)
    scales = layer["scales"].clone()
    scales[3, 1] = 1e-6  # a float16 subnormal: bits lost
    w = convert_ct_int(layer["packed"], scales, None, layer["config"])
    assert w.scales.dtype == torch.float32
    got = dequantize_wna16(w.qweight, w.scales, w.offsets, w.bits, w.group_size)
    assert torch.equal(got, dequantize_ct(layer["packed"], scales, None, None, layer["config"]))


def test_actorder_group_reorders_the_inputs() -> None:
    """``weight_g_idx`` scatters each group over K: converted with the order that makes the
    groups contiguous, input ``i`` of ours is input ``perm[i]`` of the checkpoint, same values."""
    gen = torch.Generator().manual_seed(6)
    n, k, group = 24, 96, 32
    layer = _layer(4, n, k, group, False, gen)
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=gen)]
    config = CtIntConfig(bits=4, group_size=group, symmetric=False, actorder="group")
    perm = act_order(g_idx, group)
    assert perm is not None
    w = convert_ct_int(layer["packed"], layer["scales"], layer["zp"], config, perm=perm)
    got = dequantize_wna16(w.qweight, w.scales, w.offsets, w.bits, w.group_size)
    want = dequantize_ct(layer["packed"], layer["scales"], layer["zp"], g_idx, config)
    assert torch.equal(got, want[:, perm])


class _Source:
    """The slicing interface of a checkpoint tensor (``TensorSource``) over a tensor."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.shape = t, t.shape

    def full(self) -> torch.Tensor:
        return self.t

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.t.narrow(dim, start, length)


def test_shards_convert_to_the_slices_of_the_whole() -> None:
    """Output rows (zero points 8 per word) and input columns (whole words, whole groups): each
    shard converted alone equals the same rows / columns of the whole layer converted."""
    gen = torch.Generator().manual_seed(7)
    n, k, group = 32, 128, 32
    layer = _layer(4, n, k, group, False, gen)
    config = layer["config"]
    whole = dequantize_ct(layer["packed"], layer["scales"], layer["zp"], None, config)
    tensors = {"weight_packed": layer["packed"], "weight_scale": layer["scales"],
               "weight_zero_point": layer["zp"]}
    for dim, start, length in ((0, 8, 16), (1, 64, 64)):
        part = {name: ct_slice(name, _Source(t), start, length, dim, config) for name, t in tensors.items()}
        w = convert_ct_int(part["weight_packed"], part["weight_scale"], part["weight_zero_point"], config)
        got = dequantize_wna16(w.qweight, w.scales, w.offsets, w.bits, w.group_size)
        assert torch.equal(got, whole.narrow(dim, start, length))
    with pytest.raises(ValueError, match="8 zero points per word"):
        ct_slice("weight_zero_point", _Source(layer["zp"]), 4, 8, 0, config)
    with pytest.raises(ValueError, match="cuts one"):
        ct_slice("weight_scale", _Source(layer["scales"]), 16, 32, 1, config)
    with pytest.raises(ValueError, match="8 inputs per word"):
        ct_slice("weight_packed", _Source(layer["packed"]), 4, 32, 1, config)


W4A16 = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"], "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
                    "dynamic": False, "actorder": None, "observer": "minmax"}}},
    "quantization_status": "compressed",
}


def _with_weights(**weights: Any) -> dict[str, Any]:
    group = W4A16["config_groups"]["group_0"]  # type: ignore[index]
    return {**W4A16, "config_groups": {"group_0": {**group, "weights": {**group["weights"], **weights}}}}


def test_config() -> None:
    assert is_ct_int(W4A16)
    assert CtIntConfig.from_hf(W4A16) == CtIntConfig(bits=4, group_size=128, ignore=("lm_head",))
    asym = CtIntConfig.from_hf(_with_weights(num_bits=8, symmetric=False, strategy="channel",
                                             group_size=None))
    assert asym == CtIntConfig(bits=8, group_size=-1, symmetric=False, ignore=("lm_head",))
    assert CtIntConfig.from_hf(_with_weights(actorder="group")).actorder == "group"
    # The format named per group (newer writers) rather than at the top.
    per_group = {**W4A16, "format": None, "config_groups": {"g": {**W4A16["config_groups"]["group_0"],  # type: ignore[index]
                                                                 "format": "pack-quantized"}}}
    assert CtIntConfig.from_hf(per_group).bits == 4
    fp8 = _with_weights(type="float", num_bits=8, strategy="channel")
    assert not is_ct_int(fp8)


@pytest.mark.parametrize(("change", "message"), [
    ({"format": "int-quantized"}, "only the 'pack-quantized' format"),
    ({"weights": {"num_bits": 2}}, "4- and 8-bit"),
    ({"weights": {"strategy": "tensor"}}, "group or channel"),
    ({"weights": {"group_size": 20}}, "multiple of 16"),
    ({"weights": {"actorder": "dynamic"}}, "actorder"),
    ({"weights": {"dynamic": True}}, "dynamic"),
    ({"input_activations": {"num_bits": 8, "type": "int"}}, "quantized activations"),
])
def test_refusals(change: dict[str, Any], message: str) -> None:
    if "weights" in change:
        qc = _with_weights(**change["weights"])
    elif "format" in change:
        qc = {**W4A16, **change}
    else:
        group = W4A16["config_groups"]["group_0"]  # type: ignore[index]
        qc = {**W4A16, "config_groups": {"group_0": {**group, **change}}}
    with pytest.raises(ValueError, match=message):
        CtIntConfig.from_hf(qc)


def test_mixed_schemes_are_refused() -> None:
    group = W4A16["config_groups"]["group_0"]  # type: ignore[index]
    other = {**group, "weights": {**group["weights"], "group_size": 64}}
    with pytest.raises(ValueError, match="mixed weight schemes"):
        CtIntConfig.from_hf({**W4A16, "config_groups": {"a": group, "b": other}})
