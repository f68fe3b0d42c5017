"""The fp8 linear method in a layer: a 16/32-bit checkpoint quantized per output channel as it
loads (the codes of ``quantize_fp8_per_channel``), its product through ``ops.fp8_linear``, random
weights drawn directly in e4m3; and the weight bytes an engine reports for each quantization."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gpu_worker import LLM
from gpu_worker.distributed.parallel_state import TensorParallelGroup
from gpu_worker.model_executor.layers.activation import SiluAndMul
from gpu_worker.model_executor.layers.norm import RMSNorm
from gpu_worker.model_executor.layers.parallel import MergedColumnParallelLinear, RowParallelLinear
from gpu_worker.model_executor.layers.quantization.fp8 import Fp8LinearMethod
from gpu_worker.model_executor.layers.quantization.fp8_block import Fp8BlockLinearMethod
from gpu_worker.model_executor.layers.quantization.fp8_format import (
    Fp8CheckpointFormat,
    quantize_fp8_per_channel,
)
from gpu_worker.model_executor.weights import TensorSource
from kernels import FP8_WEIGHT_ONLY_MAX_M, reference_ops
from kernels.quant_reference import (
    FP8_DTYPE,
    Fp8Activation,
    dequantize_fp8,
    dequantize_fp8_blocks,
    fp8_block_linear,
    fp8_block_weight_only_linear,
    fp8_linear,
    fp8_weight_only_linear,
)


def test_16bit_weights_quantized_as_they_load() -> None:
    gen = torch.Generator().manual_seed(0)
    gate, up = torch.randn(48, 64, generator=gen) * 0.1, torch.randn(48, 64, generator=gen) * 0.3
    layer = MergedColumnParallelLinear(
        64,
        [48, 48],
        bias=False,
        dtype=torch.float32,
        tp=TensorParallelGroup(),
        method=Fp8LinearMethod(reference_ops()),
    )
    assert layer.weight.dtype == FP8_DTYPE  # e4m3 from the start: never a 16-bit copy of the layer
    assert set(layer.load("weight", TensorSource.of(gate), 0)) == {"weight", "weight_scale"}
    layer.load("weight", TensorSource.of(up.bfloat16()), 1)
    q, s = quantize_fp8_per_channel(torch.cat([gate, up.bfloat16().float()]))
    assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(
        layer.weight_scale, s
    )
    x = torch.randn(3, 64, generator=gen)
    assert torch.equal(layer(x), fp8_linear(x, q, s))


def test_one_token_runs_weight_only_and_its_norm_hands_over_16_bit() -> None:
    """With ``fp8_weight_only_max_m`` 1 (the default), a one-token step's fp8 linear reads the
    unquantized activation (W8A16) and the norm and SiLU before it skip their quantization;
    two tokens, or the threshold at 0, keep W8A8 with the activation quantized by the op."""
    gen = torch.Generator().manual_seed(4)
    q, s = quantize_fp8_per_channel(torch.randn(48, 64, generator=gen) * 0.1)
    ops, w8a8_ops = reference_ops(), reference_ops(fp8_weight_only_max_m=0)
    assert ops.fp8_weight_only_max_m == FP8_WEIGHT_ONLY_MAX_M == 1
    for tokens, o, weight_only in ((1, ops, True), (2, ops, False), (1, w8a8_ops, False)):
        layer = RowParallelLinear(64, 48, bias=False, dtype=torch.float32, tp=TensorParallelGroup(),
                                  method=Fp8LinearMethod(o))
        layer.weight.copy_(q)
        layer.weight_scale.copy_(s)
        norm, act = RMSNorm(64, 1e-6, o), SiluAndMul(o)
        norm.fp8_out = act.fp8_out = True
        x = torch.randn(tokens, 64, generator=gen)
        handed = [norm(x), norm(x, x.clone())[0], act(torch.randn(tokens, 128, generator=gen))]
        assert all(isinstance(h, Fp8Activation) != weight_only for h in handed), tokens
        want = fp8_weight_only_linear(x, q, s) if weight_only else fp8_linear(x, q, s)
        assert torch.equal(layer(x), want)
    # Weight-only is the dequantized weight's product; W8A8 also rounds the activation.
    x = torch.randn(1, 64, generator=gen)
    dense = x @ dequantize_fp8(q, s).t()
    torch.testing.assert_close(fp8_weight_only_linear(x, q, s), dense, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fp8_linear(x, q, s), dense, rtol=1e-5, atol=1e-6)


def test_random_fp8_weights() -> None:
    layer = RowParallelLinear(
        512,
        256,
        bias=False,
        dtype=torch.bfloat16,
        tp=TensorParallelGroup(),
        method=Fp8LinearMethod(reference_ops()),
    )
    assert layer.linear_method.fill_random(layer, seed=3, std=0.02)
    assert layer.weight.dtype == FP8_DTYPE and bool((layer.weight_scale > 0).all())
    std = float(dequantize_fp8(layer.weight, layer.weight_scale).std())
    assert 0.019 < std < 0.021


def test_random_block_fp8_weights_and_the_two_products() -> None:
    """Random block-wise weights (drawn in chunks of whole block rows, here 300 rows in blocks of
    128, the last partial); one token runs weight-only, more tokens W8A8 per token group; a
    layer whose inputs are not whole blocks is refused."""
    block = (128, 64)
    fmt = Fp8CheckpointFormat("weight_scale_inv", False, block=block)
    method = Fp8BlockLinearMethod(reference_ops(), fmt)
    layer = MergedColumnParallelLinear(256, [150, 150], bias=False, dtype=torch.float32,
                                       tp=TensorParallelGroup(), method=method)
    assert method.fill_random(layer, seed=5, std=0.02)
    assert layer.weight.dtype == FP8_DTYPE and tuple(layer.weight_scale.shape) == (3, 4)
    w = dequantize_fp8_blocks(layer.weight, layer.weight_scale, block)
    assert 0.019 < float(w.std()) < 0.021
    x = torch.randn(3, 256)
    one = layer(x[:1])
    assert torch.equal(one, fp8_block_weight_only_linear(x[:1], layer.weight, layer.weight_scale, block))
    three = layer(x)
    assert torch.equal(three, fp8_block_linear(x, layer.weight, layer.weight_scale, block))
    torch.testing.assert_close(three, x @ w.t(), rtol=0.1, atol=0.05)  # activations' fp8 rounding
    with pytest.raises(ValueError, match="whole blocks of 64 inputs"):
        RowParallelLinear(96, 128, bias=False, dtype=torch.float32, tp=TensorParallelGroup(), method=method)


def test_weight_bytes_per_quantization(tiny_model: Callable[[str], Path]) -> None:
    """fp8 stores each projection weight in one byte plus a float32 scale per row; random
    symmetric 4-bit weights half a byte plus a float16 scale per group (128 inputs, or the
    largest power of two dividing K); embeddings and the LM head stay float32."""

    def group(k: int) -> int:
        g = 128
        while k % g:
            g //= 2
        return g

    sizes = {}
    for quantization in ("none", "fp8", "gptq"):
        llm = LLM(
            model=str(tiny_model("llama")),
            load_format="dummy",
            quantization=quantization,
            skip_tokenizer_init=True,
            num_kv_blocks=8,
        )
        sizes[quantization] = llm.engine.core.weight_bytes
        if quantization == "none":
            model = llm.engine.core.runner.model
            linear = [
                m
                for name, m in model.named_modules()
                if name.endswith(("qkv_proj", "o_proj", "up_proj", "down_proj"))
            ]
            numel = sum(m.weight_t.numel() for m in linear)
            rows = sum(m.weight_t.shape[1] for m in linear)
            groups = sum(
                m.weight_t.shape[1] * (m.weight_t.shape[0] // group(m.weight_t.shape[0])) for m in linear
            )
    assert sizes["fp8"] == sizes["none"] - 4 * numel + numel + 4 * rows
    assert sizes["gptq"] == sizes["none"] - 4 * numel + numel // 2 + 2 * groups
