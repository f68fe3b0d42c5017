"""Which quantization serves a model (``select.py``), and each layer's linear method."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gpu_worker.model_executor.layers.quantization.base import UnquantizedLinearMethod
from gpu_worker.model_executor.layers.quantization.fp8 import Fp8LinearMethod
from gpu_worker.model_executor.layers.quantization.fp8_block import Fp8BlockLinearMethod
from gpu_worker.model_executor.layers.quantization.select import (
    bytes_per_weight,
    kv_cache_torch_dtype,
    make_linear_methods,
    resolve_quantization,
    serves_gguf_quantized,
)
from gpu_worker.model_executor.layers.quantization.wna16 import WnA16LinearMethod
from kernels.quant_reference import FP8_DTYPE

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
GGUF = Path("model.gguf")
DENSE = SimpleNamespace()
FP8_CT = SimpleNamespace(
    quantization_config={
        "quant_method": "compressed-tensors",
        "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8, "strategy": "channel"}}},
        "ignore": ["lm_head", "re:.*layers\\.0\\.mlp\\.(gate|up)_proj"],
    }
)
GPTQ = SimpleNamespace(quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
AWQ = SimpleNamespace(quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128,
                                           "zero_point": True, "version": "gemm"})
FP8_BLOCK = SimpleNamespace(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
CT_W4A16 = SimpleNamespace(quantization_config={
    "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
    "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 128,
                                        "symmetric": True}}},
})


def resolve(
    requested: str,
    hf: object = DENSE,
    *,
    gguf: bool = False,
    quantized: bool = False,
    load_format: str = "auto",
) -> str:
    return resolve_quantization(
        requested, hf, gguf_file=GGUF if gguf else None, gguf_quantized=quantized, load_format=load_format
    )


def test_auto_serves_what_the_checkpoint_is() -> None:
    assert resolve("auto") == "none"
    assert resolve("auto", FP8_CT) == "fp8"
    assert resolve("auto", GPTQ) == "gptq"
    assert resolve("auto", FP8_BLOCK) == "fp8"
    assert resolve("auto", AWQ) == "awq" and resolve("awq", AWQ) == "awq"
    assert resolve("auto", CT_W4A16) == "compressed-tensors" == resolve("compressed-tensors", CT_W4A16)
    assert resolve("compressed-tensors", FP8_CT) == "fp8"  # vLLM's name for both kinds
    assert resolve("auto", gguf=True) == "none"  # the dequantized cache
    assert resolve("auto", gguf=True, quantized=True) == "gguf"
    assert resolve("fp8") == "fp8" and resolve("fp8", FP8_CT) == "fp8" and resolve("fp8", gguf=True) == "fp8"
    assert resolve("gptq", load_format="dummy") == "gptq"  # random 4-bit weights
    assert resolve("fp8", GPTQ, load_format="dummy") == "fp8"  # a dummy load ignores the checkpoint


def test_refusals() -> None:
    with pytest.raises(ValueError, match="gptq-quantized"):
        resolve("fp8", GPTQ)
    with pytest.raises(ValueError, match="fp8-quantized"):
        resolve("none", FP8_CT)
    with pytest.raises(ValueError, match="needs a GPTQ checkpoint"):
        resolve("gptq")
    with pytest.raises(ValueError, match="'awq' needs a checkpoint in that format"):
        resolve("awq")
    with pytest.raises(ValueError, match="awq-quantized"):
        resolve("gptq", AWQ)
    with pytest.raises(ValueError, match="'compressed-tensors' needs a checkpoint in that format"):
        resolve("compressed-tensors")
    with pytest.raises(ValueError, match="compressed-tensors-quantized"):
        resolve("gptq", CT_W4A16)
    with pytest.raises(ValueError, match="pack-quantized"):
        qc = {**CT_W4A16.quantization_config, "format": "int-quantized"}
        resolve("auto", SimpleNamespace(quantization_config=qc))
    with pytest.raises(ValueError, match="serves a .gguf"):
        resolve("gguf")
    with pytest.raises(ValueError, match="not supported"):
        resolve("auto", SimpleNamespace(quantization_config={"quant_method": "bitsandbytes"}))
    with pytest.raises(ValueError, match="block_k a power of two"):
        resolve(
            "auto",
            SimpleNamespace(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 96]}),
        )


def test_gguf_defaults_by_device() -> None:
    """A .gguf is served quantized on CUDA and through its dequantized cache on the CPU, unless
    asked for (docs/QUANTIZATION.md: the CPU multiplies 32-bit weights faster)."""
    assert serves_gguf_quantized("auto", GGUF, CUDA) and not serves_gguf_quantized("auto", GGUF, CPU)
    assert serves_gguf_quantized("gguf", GGUF, CPU)
    assert not serves_gguf_quantized("none", GGUF, CUDA) and not serves_gguf_quantized("fp8", GGUF, CUDA)
    assert not serves_gguf_quantized("gguf", None, CUDA)


def test_linear_methods_keep_the_head_and_ignored_modules_unquantized() -> None:
    pick = make_linear_methods("fp8", FP8_CT, CPU)
    assert isinstance(pick("model.layers.0.self_attn.qkv_proj"), Fp8LinearMethod)
    assert isinstance(pick("model.layers.1.mlp.gate_up_proj"), Fp8LinearMethod)
    assert isinstance(pick("model.layers.0.mlp.gate_up_proj"), UnquantizedLinearMethod)  # both parts ignored
    assert isinstance(pick("lm_head"), UnquantizedLinearMethod)
    half = SimpleNamespace(
        quantization_config={**FP8_CT.quantization_config, "ignore": ["model.layers.0.mlp.up_proj"]}
    )
    with pytest.raises(ValueError, match="fused"):
        make_linear_methods("fp8", half, CPU)("model.layers.0.mlp.gate_up_proj")
    assert isinstance(
        make_linear_methods("gptq", GPTQ, CPU)("model.layers.0.mlp.down_proj"), WnA16LinearMethod
    )
    awq = make_linear_methods("awq", AWQ, CPU)("model.layers.0.mlp.down_proj")
    assert isinstance(awq, WnA16LinearMethod) and awq.awq is not None and awq.gptq is None
    assert isinstance(make_linear_methods("awq", AWQ, CPU)("lm_head"), UnquantizedLinearMethod)
    ct = make_linear_methods("compressed-tensors", CT_W4A16, CPU)
    method = ct("model.layers.0.mlp.down_proj")
    assert isinstance(method, WnA16LinearMethod) and method.ct is not None and method.ct.group_size == 128
    assert isinstance(ct("lm_head"), UnquantizedLinearMethod)
    block = make_linear_methods("fp8", FP8_BLOCK, CPU)
    method = block("model.layers.0.mlp.down_proj")
    assert isinstance(method, Fp8BlockLinearMethod) and method.block == (128, 128)
    assert isinstance(block("lm_head"), UnquantizedLinearMethod)
    assert isinstance(
        make_linear_methods("none", DENSE, CPU)("model.layers.0.mlp.down_proj"), UnquantizedLinearMethod
    )


def test_the_head_is_quantized_only_where_the_checkpoint_stores_it_so() -> None:
    """GPTQ's ``lm_head: true``, a compressed-tensors integer checkpoint that does not ignore
    ``lm_head`` and a GGUF's ``output.weight`` give the untied head the 4-bit method; a tied head
    asks for the embedding's method, always 16-bit; fp8 heads stay 16-bit."""
    head_gptq = SimpleNamespace(quantization_config={**GPTQ.quantization_config, "lm_head": True})
    assert isinstance(make_linear_methods("gptq", head_gptq, CPU)("lm_head"), WnA16LinearMethod)
    assert isinstance(make_linear_methods("gptq", GPTQ, CPU)("lm_head"), UnquantizedLinearMethod)
    assert isinstance(make_linear_methods("gguf", DENSE, CPU)("lm_head"), WnA16LinearMethod)
    for quantization, hf in (("gptq", head_gptq), ("gguf", DENSE), ("fp8", FP8_CT)):
        assert isinstance(make_linear_methods(quantization, hf, CPU)("embed_tokens"), UnquantizedLinearMethod)
    no_ignore = SimpleNamespace(quantization_config={**FP8_CT.quantization_config, "ignore": []})
    assert isinstance(make_linear_methods("fp8", no_ignore, CPU)("lm_head"), UnquantizedLinearMethod)
    # compressed-tensors integer weights: the head is stored quantized unless ``ignore`` names it.
    ct_head = SimpleNamespace(quantization_config={**CT_W4A16.quantization_config, "ignore": []})
    assert isinstance(make_linear_methods("compressed-tensors", ct_head, CPU)("lm_head"), WnA16LinearMethod)
    ct_plain = make_linear_methods("compressed-tensors", CT_W4A16, CPU)("lm_head")
    assert isinstance(ct_plain, UnquantizedLinearMethod)


def test_kv_cache_dtype_and_bytes_per_weight() -> None:
    assert kv_cache_torch_dtype("auto", torch.bfloat16, CPU) == torch.bfloat16
    assert kv_cache_torch_dtype("fp8", torch.bfloat16, CPU) == FP8_DTYPE
    assert bytes_per_weight("fp8", 2) == 1.0 and bytes_per_weight("none", 2) == 2.0
    assert bytes_per_weight("gptq", 2) < 1.0 and bytes_per_weight("compressed-tensors", 2) < 1.0
    # 8-bit checkpoints size as 8-bit: a byte plus the scales, not a nibble.
    gptq8 = SimpleNamespace(quantization_config={**GPTQ.quantization_config, "bits": 8})
    assert bytes_per_weight("gptq", 2, GPTQ) == 0.5625 and bytes_per_weight("gptq", 2, gptq8) == 1.0625
    group = CT_W4A16.quantization_config["config_groups"]["g"]
    ct8 = SimpleNamespace(quantization_config={**CT_W4A16.quantization_config, "config_groups": {
        "g": {**group, "weights": {**group["weights"], "num_bits": 8}}}})
    assert bytes_per_weight("compressed-tensors", 2, ct8) == 1.0625
    assert bytes_per_weight("awq", 2, AWQ) == 0.5625 and bytes_per_weight("gptq", 2, DENSE) == 0.5625
    assert bytes_per_weight("gptq", 2, FP8_CT) == 0.5625  # a dummy load ignores the checkpoint's config


def test_worker_flags_and_variables() -> None:
    """``--quantization`` / ``--kv-cache-dtype`` (and their LLMSERVE_* variables) reach the engine
    config; values outside the lists are refused naming the setting."""
    from gpu_worker.__main__ import build_parser, configs_from_args

    args = build_parser({}).parse_args(["--model", "m", "--quantization", "fp8", "--kv-cache-dtype", "fp8"])
    engine, _ = configs_from_args(args)
    assert (engine.quantization, engine.kv_cache_dtype) == ("fp8", "fp8")
    env = {"LLMSERVE_QUANTIZATION": "gptq", "LLMSERVE_KV_CACHE_DTYPE": "auto"}
    engine, _ = configs_from_args(build_parser(env).parse_args(["--model", "m"]))
    assert (engine.quantization, engine.kv_cache_dtype) == ("gptq", "auto")
    engine, _ = configs_from_args(build_parser({}).parse_args(["--model", "m"]))
    assert (engine.quantization, engine.kv_cache_dtype) == ("auto", "auto")
    with pytest.raises(ValueError, match="quantization must be one of"):
        configs_from_args(build_parser({}).parse_args(["--model", "m", "--quantization", "bnb"]))
    engine, _ = configs_from_args(build_parser({}).parse_args(["--model", "m", "--quantization", "awq"]))
    assert engine.quantization == "awq"
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        configs_from_args(build_parser({}).parse_args(["--model", "m", "--kv-cache-dtype", "int8"]))
