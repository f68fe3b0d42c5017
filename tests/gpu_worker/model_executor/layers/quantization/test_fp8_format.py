"""FP8 weight formats: load-time quantization, the CPU emulation, pre-quantized checkpoint configs."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.model_executor.layers.quantization import fp8_format
from kernels import quant_reference as qref


def test_quantize_fp8_per_channel() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen) * torch.logspace(-3, 1, 16)[:, None]
    q, scale = fp8_format.quantize_fp8_per_channel(w.bfloat16())
    assert q.dtype == torch.float8_e4m3fn and q.shape == (16, 64)
    assert scale.dtype == torch.float32 and scale.shape == (16,)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((16,), 448.0))  # each row uses the range
    back = qref.dequantize_fp8(q, scale)
    rel = (back - w.bfloat16().float()).abs() / w.bfloat16().float().abs().amax(dim=1, keepdim=True)
    assert float(rel.max()) <= 2.0**-4  # half an e4m3 step at the top of the range


def test_fp8_emulated_weight_is_the_gpu_rounding() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 32, generator=gen)
    emulated = fp8_format.fp8_emulated_weight(w)
    q, scale = fp8_format.quantize_fp8_per_channel(w)
    assert emulated.dtype == w.dtype and torch.equal(emulated, q.float() * scale[:, None])
    # fp8_linear's weight side is exactly this weight: a linear with the emulated weight and
    # per-token quantized activations is the W8A8 reference.
    x = torch.randn(3, 32, generator=gen)
    xq, xs = qref.quantize_fp8_per_token(x)
    want = (xq.float() * xs) @ emulated.t()
    torch.testing.assert_close(qref.fp8_linear(x, q, scale), want, rtol=1e-5, atol=1e-5)


def _weights(kind: str, strategy: str) -> dict[str, dict[str, object]]:
    return {"g": {"weights": {"num_bits": 8, "type": kind, "strategy": strategy}}}


def test_parse_fp8_checkpoints() -> None:
    group = {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "dynamic": True},
    }
    channel = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
    }
    fmt = fp8_format.parse_fp8_checkpoint(channel)
    assert fmt == fp8_format.Fp8CheckpointFormat("weight_scale", per_channel=True, ignore=("lm_head",))
    tensor = {**channel, "config_groups": _weights("float", "tensor")}
    assert not fp8_format.parse_fp8_checkpoint(tensor).per_channel
    hf = fp8_format.parse_fp8_checkpoint({"quant_method": "fp8", "activation_scheme": "dynamic"})
    assert hf.scale_name == "weight_scale_inv" and not hf.per_channel
    # Block-wise scales: HF's weight_block_size (DeepSeek-V3, Qwen3 FP8) and compressed-tensors'
    # strategy block; blocks our kernels cannot tile are refused by name.
    deepseek = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                "weight_block_size": [128, 128]}
    assert fp8_format.parse_fp8_checkpoint(deepseek) == fp8_format.Fp8CheckpointFormat(
        "weight_scale_inv", per_channel=False, block=(128, 128))
    ct_block = {**channel, "config_groups": {"g": {"weights": {
        "num_bits": 8, "type": "float", "strategy": "block", "block_structure": [64, 128]}}}}
    assert fp8_format.parse_fp8_checkpoint(ct_block).block == (64, 128)
    for bad in ([128, 96], [128, 8], [0, 128], [128], "128x128", [128.0, 128.0]):
        with pytest.raises(ValueError, match="block"):
            fp8_format.parse_fp8_checkpoint({"quant_method": "fp8", "weight_block_size": bad})
    groups = {"blocks": ct_block["config_groups"]["g"], **_weights("float", "channel")}
    mixed = {**channel, "config_groups": groups}
    with pytest.raises(ValueError, match="mixed"):
        fp8_format.parse_fp8_checkpoint(mixed)
    int8 = {**channel, "config_groups": _weights("int", "channel")}
    with pytest.raises(ValueError):
        fp8_format.parse_fp8_checkpoint(int8)
    with pytest.raises(ValueError):
        fp8_format.parse_fp8_checkpoint({"quant_method": "gptq"})


def test_fp8_scales_per_channel() -> None:
    assert torch.equal(fp8_format.fp8_scales_per_channel(torch.tensor(0.5), 3), torch.full((3,), 0.5))
    assert torch.equal(fp8_format.fp8_scales_per_channel(torch.tensor([0.25]), 2), torch.full((2,), 0.25))
    col = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.bfloat16)
    assert torch.equal(fp8_format.fp8_scales_per_channel(col, 3), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="block-wise"):
        fp8_format.fp8_scales_per_channel(torch.ones(2, 4), 256)
    with pytest.raises(ValueError):
        fp8_format.check_fp8_weight(torch.zeros(4, 4))
    w = fp8_format.check_fp8_weight(torch.zeros(4, 8).to(torch.float8_e4m3fn).t())
    assert w.is_contiguous()


def test_fp8_refused_without_a_capable_gpu() -> None:
    assert not fp8_format.fp8_supported("cpu")
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        fp8_format.require_fp8("cpu")
