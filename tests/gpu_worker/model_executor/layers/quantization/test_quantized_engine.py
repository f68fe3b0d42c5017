"""Pre-quantized checkpoints through the engine (``LLM(model=dir)``, quantization ``auto``), CPU.

A tiny random Llama is written as compressed-tensors fp8 (per channel, per tensor with KV
scales, and per block), as HF ``quant_method: "fp8"`` (per tensor, and per block as DeepSeek-V3
publishes it) and as GPTQ (4 bits, symmetric and asymmetric, with its
LM head quantized too, and act-order), in the
published formats (``tests/helpers/quantized_checkpoints.py``). The engine must load each as it
is (fp8 codes and scales untouched) and compute what HF transformers computes with the
dequantized weights: for GPTQ exactly that model; for fp8, W8A8, that model with each linear
layer's input quantized per token (e4m3, the same rounding), so greedy tokens agree token for
token. With two tensor-parallel ranks (gloo) the tokens equal one rank's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_worker import LLM, SamplingParams
from gpu_worker.model_executor.layers.quantization.wna16 import WnA16LinearMethod
from kernels.quant_reference import FP8_DTYPE, quantize_fp8_rows
from tests.gpu_worker.engine.engine_helpers import hf_greedy
from tests.helpers.quantized_checkpoints import (
    write_awq_checkpoint,
    write_ct_int_checkpoint,
    write_dense_checkpoint,
    write_fp8_checkpoint,
    write_gptq_checkpoint,
)

MAX_TOKENS = 16
PROMPTS = [[(11 * i + 7 * j) % 3000 + 20 for j in range(5 + 9 * i)] for i in range(4)]
ENGINE = dict(skip_tokenizer_init=True, num_kv_blocks=64, max_num_seqs=4, enforce_eager=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def engine_tokens(model_dir: Path, **engine: Any) -> tuple[list[list[int]], LLM]:
    llm = LLM(model=str(model_dir), **{**ENGINE, **engine})
    outs = llm.generate(PROMPTS, GREEDY)
    return [list(o.outputs[0].token_ids) for o in outs], llm


def reference_tokens(
    model_dir: Path, fake_quant_fp8: bool, tp: int = 1, group: int | None = None
) -> list[list[int]]:
    """HF transformers over ``model_dir`` (float32); with ``fake_quant_fp8`` every linear layer
    but the LM head sees its input quantized per token and dequantized (W8A8's activations).
    ``tp``: the input of a row-parallel layer (o_proj, down_proj) is quantized in ``tp`` equal
    slices of columns, each with its own per-token scale, as each rank does with its slice.
    ``group``: quantized per token in groups of ``group`` inputs (block-wise fp8), whatever ``tp``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def fake_quant(x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_fp8_rows(x.reshape(-1, group or x.shape[-1]))
        return (q.float() * scale).reshape(x.shape).to(x.dtype)

    def hook(slices: int) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], tuple[torch.Tensor]]:
        def quantize_input(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
            return (torch.cat([fake_quant(part) for part in args[0].chunk(slices, dim=-1)], dim=-1),)

        return quantize_input

    if fake_quant_fp8:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                row_parallel = name.endswith(("o_proj", "down_proj")) and group is None
                module.register_forward_pre_hook(hook(tp if row_parallel else 1))
    return [hf_greedy_ignoring_eos(model, p) for p in PROMPTS]


def hf_greedy_ignoring_eos(model: Any, prompt: list[int]) -> list[int]:
    model.generation_config.eos_token_id = None
    return hf_greedy(model, prompt, MAX_TOKENS)


@pytest.fixture(scope="module")
def llama(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, llama: Path) -> Iterator[Callable[[str], Path]]:
    """``checkpoints(kind)`` -> (quantized folder); its dense reference is ``<folder>-ref``."""
    root = tmp_path_factory.mktemp("quantized")
    writers: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
        "ct-channel": lambda d: write_fp8_checkpoint(llama, d, per_channel=True, kv_scales=(0.05, 0.02)),
        "ct-tensor": lambda d: write_fp8_checkpoint(llama, d, per_channel=False),
        "hf-fp8": lambda d: write_fp8_checkpoint(llama, d, naming="hf", per_channel=False),
        "hf-block": lambda d: write_fp8_checkpoint(llama, d, naming="hf", block=BLOCKS["hf-block"]),
        "ct-block": lambda d: write_fp8_checkpoint(llama, d, block=BLOCKS["ct-block"]),
        "gptq-sym": lambda d: write_gptq_checkpoint(llama, d, bits=4, group_size=32, sym=True),
        "gptq-asym": lambda d: write_gptq_checkpoint(llama, d, bits=4, group_size=32, sym=False),
        "gptq-head": lambda d: write_gptq_checkpoint(llama, d, group_size=32, sym=False, lm_head=True),
        "gptq-act": lambda d: write_gptq_checkpoint(llama, d, group_size=32, sym=False, desc_act=True),
        "awq": lambda d: write_awq_checkpoint(llama, d, group_size=32),
        "ct-w4a16": lambda d: write_ct_int_checkpoint(llama, d, bits=4, group_size=32),
        "ct-w4a16-asym": lambda d: write_ct_int_checkpoint(llama, d, bits=4, group_size=32, symmetric=False),
        "ct-w8a16": lambda d: write_ct_int_checkpoint(llama, d, bits=8, group_size=-1),
        "ct-w4a16-act": lambda d: write_ct_int_checkpoint(llama, d, group_size=32, symmetric=False,
                                                          actorder="group"),
        "ct-w4a16-head": lambda d: write_ct_int_checkpoint(llama, d, group_size=32, lm_head=True),
    }
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            folder = root / kind
            dequantized = writers[kind](folder)
            write_dense_checkpoint(llama, root / f"{kind}-ref", dequantized)
            made[kind] = folder
        return made[kind]

    yield get


@pytest.mark.parametrize("kind", ["ct-channel", "ct-tensor", "hf-fp8"])
def test_fp8_checkpoint_loads_as_is_and_matches_w8a8_reference(
    checkpoints: Callable[[str], Path], kind: str
) -> None:
    folder = checkpoints(kind)
    tokens, llm = engine_tokens(folder)
    assert llm.engine.config.quantization == "fp8"
    model = llm.engine.core.runner.model
    # No requantization: the fused QKV holds the checkpoint's e4m3 codes, scales broadcast exactly.
    from safetensors.torch import load_file

    ckpt = load_file(str(folder / "model.safetensors"))
    qkv = model.model.layers[0].self_attn.qkv_proj
    names = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    codes = torch.cat([ckpt[f"{n}.weight"] for n in names])
    assert qkv.weight.dtype == FP8_DTYPE
    assert torch.equal(qkv.weight.view(torch.uint8), codes.view(torch.uint8))
    scale_name = "weight_scale_inv" if kind == "hf-fp8" else "weight_scale"
    scales = torch.cat([ckpt[f"{n}.{scale_name}"].float().reshape(-1).expand(ckpt[f"{n}.weight"].shape[0])
                        for n in names])
    assert torch.equal(qkv.weight_scale, scales)
    assert model.lm_head.weight_t.dtype == torch.float32  # the LM head stays unquantized (CPU layout)
    # The norms before qkv / gate_up and SiLU-and-mul before down hand their fp8 linear its input
    # quantized (Fp8Activation); the final norm feeds the 16-bit LM head and does not.
    for layer in model.model.layers:
        assert all(m.fp8_out for m in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp.act))
    assert model.model.norm is not None and not model.model.norm.fp8_out
    if kind == "ct-channel":  # the checkpoint's KV scales reached the attention layers
        attn = model.model.layers[1].self_attn.attn
        assert float(attn.k_scale) == pytest.approx(0.05) and float(attn.v_scale) == pytest.approx(0.02)
    llm.shutdown()
    assert tokens == reference_tokens(folder.parent / f"{kind}-ref", fake_quant_fp8=True)


# Block sizes of the block-wise fp8 checkpoints (the tiny Llama: q 64 rows, k / v 32, gate / up
# 128, inputs 64 and 128): 16 x 16 splits at whole blocks on two TP ranks, 32 x 32 does not.
BLOCKS = {"hf-block": (16, 16), "ct-block": (32, 32)}


@pytest.mark.parametrize("kind", ["hf-block", "ct-block"])
def test_block_fp8_checkpoint_loads_as_is_and_matches_reference(
    checkpoints: Callable[[str], Path], kind: str
) -> None:
    """Block-wise scales (DeepSeek-style): the fused QKV holds the checkpoint's codes and its
    parts' block scales stacked; norms hand over 16-bit activations (each linear quantizes its
    input per token group); the tokens are HF's over the dequantized weights with each linear's
    input quantized per token in groups of block_k."""
    folder = checkpoints(kind)
    tokens, llm = engine_tokens(folder)
    assert llm.engine.config.quantization == "fp8"
    model = llm.engine.core.runner.model
    from safetensors.torch import load_file

    ckpt = load_file(str(folder / "model.safetensors"))
    qkv = model.model.layers[0].self_attn.qkv_proj
    names = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    scale_name = "weight_scale_inv" if kind.startswith("hf") else "weight_scale"
    codes = torch.cat([ckpt[f"{n}.weight"] for n in names])
    assert torch.equal(qkv.weight.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(qkv.weight_scale, torch.cat([ckpt[f"{n}.{scale_name}"] for n in names]))
    bn, bk = BLOCKS[kind]
    assert qkv.weight_scale.shape == (128 // bn, 64 // bk)
    assert model.lm_head.weight_t.dtype == torch.float32  # no ignore list: the head is simply 16-bit
    for layer in model.model.layers:
        norms = (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp.act)
        assert not any(m.fp8_out for m in norms)
    llm.shutdown()
    assert tokens == reference_tokens(folder.parent / f"{kind}-ref", fake_quant_fp8=True, group=bk)


def test_block_fp8_qwen3_checkpoint(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    """Qwen3 (per-head q/k norms, as the Qwen3 FP8 releases are): a block-wise checkpoint of it
    gives HF's tokens over the dequantized weights with inputs quantized per token group."""
    qwen3 = tiny_model("qwen3")
    dequantized = write_fp8_checkpoint(qwen3, tmp_path / "q", naming="hf", block=(16, 16))
    write_dense_checkpoint(qwen3, tmp_path / "ref", dequantized)
    tokens, llm = engine_tokens(tmp_path / "q")
    assert llm.engine.config.quantization == "fp8"
    llm.shutdown()
    assert tokens == reference_tokens(tmp_path / "ref", fake_quant_fp8=True, group=16)


def test_block_fp8_two_tensor_parallel_ranks_equal_one(checkpoints: Callable[[str], Path]) -> None:
    """TP=2 over gloo: each rank holds whole blocks (rows for QKV / gate-up, inputs for O /
    down) and quantizes whole input groups, so it computes what one rank does: the same tokens.
    A layout that cuts blocks (32-row blocks of 16-row K/V shards) is refused, naming the fix;
    the failed engine leaves no process group behind."""
    folder = checkpoints("hf-block")
    one, llm = engine_tokens(folder)
    llm.shutdown()
    two, llm = engine_tokens(folder, tensor_parallel_size=2)
    llm.shutdown()
    assert two == one
    with pytest.raises(ValueError, match="cut blocks of 32 rows.*tensor_parallel_size"):
        LLM(model=str(checkpoints("ct-block")), tensor_parallel_size=2, **ENGINE)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("kind", ["gptq-sym", "gptq-asym"])
def test_gptq_checkpoint_matches_dequantized_reference(checkpoints: Callable[[str], Path], kind: str) -> None:
    folder = checkpoints(kind)
    tokens, llm = engine_tokens(folder)
    layers = llm.engine.core.runner.model.model.layers
    assert not any(m.fp8_out for layer in layers for m in (layer.input_layernorm, layer.mlp.act))
    assert llm.engine.config.quantization == "gptq"
    layer = llm.engine.core.runner.model.model.layers[0]
    segments = layer.self_attn.qkv_proj.wna16.segments
    assert len(segments) == 1 and segments[0].weight.bits == 4  # q, k, v fused into one 4-bit matrix
    assert (segments[0].weight.offsets is None) == (kind == "gptq-sym")
    llm.shutdown()
    assert tokens == reference_tokens(folder.parent / f"{kind}-ref", fake_quant_fp8=False)


def test_gptq_checkpoint_with_a_quantized_head(checkpoints: Callable[[str], Path]) -> None:
    """``lm_head: true``: the head loads its GPTQ tensors as they are (no 16-bit ``weight``) and
    the tokens are HF's over the dequantized head and projections; two TP ranks (each half of the
    vocabulary, the logits gathered) give the same tokens."""
    folder = checkpoints("gptq-head")
    tokens, llm = engine_tokens(folder)
    head = llm.engine.core.runner.model.lm_head
    assert head.quantized and not hasattr(head, "weight_t")
    (segment,) = head.wna16.segments
    assert (segment.weight.bits, segment.weight.out_features) == (4, 49152)
    llm.shutdown()
    assert tokens == reference_tokens(folder.parent / "gptq-head-ref", fake_quant_fp8=False)
    two, llm = engine_tokens(folder, tensor_parallel_size=2)
    llm.shutdown()
    assert two == tokens


def test_gptq_act_order_checkpoint(checkpoints: Callable[[str], Path]) -> None:
    """``desc_act: true`` (each group a scattered set of inputs, named by ``g_idx``): every layer
    holds its weight with the inputs reordered group by group and reorders its input the same
    way (down_proj's input arrives reordered: gate_up's rows are); q/k/v (and gate/up) share one
    order, so each fused layer stays one 4-bit matrix. The
    tokens are HF's over the dequantized weights. Two TP ranks would split o/down by inputs,
    which cuts act-order groups apart: refused, naming the fix."""
    folder = checkpoints("gptq-act")
    tokens, llm = engine_tokens(folder)
    layer = llm.engine.core.runner.model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    for proj in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj):
        (segment,) = proj.wna16.segments
        assert segment.perm is not None
    # down_proj's order is made by gate_up's output rows (wna16.fold_input_order): no reorder.
    (segment,) = mlp.down_proj.wna16.segments
    assert segment.perm is None
    llm.shutdown()
    assert tokens == reference_tokens(folder.parent / "gptq-act-ref", fake_quant_fp8=False)
    with pytest.raises(ValueError, match="cannot be split by inputs.*tensor_parallel_size=1"):
        LLM(model=str(folder), tensor_parallel_size=2, **ENGINE)
    # The failed engine left the process group and ended its rank: a later one can start.
    assert not torch.distributed.is_initialized()
    two, llm = engine_tokens(checkpoints("gptq-asym"), tensor_parallel_size=2)
    llm.shutdown()
    assert len(two) == len(PROMPTS)


def test_16bit_checkpoint_quantized_at_load_equals_per_channel_checkpoint(
    checkpoints: Callable[[str], Path], llama: Path
) -> None:
    """fp8 quantization at load computes the codes and scales a per-channel fp8 checkpoint holds."""
    at_load, llm = engine_tokens(llama, quantization="fp8")
    qkv = llm.engine.core.runner.model.model.layers[0].self_attn.qkv_proj
    weight, scale = qkv.weight.view(torch.uint8).clone(), qkv.weight_scale.clone()
    llm.shutdown()
    stored, llm = engine_tokens(checkpoints("ct-channel"), kv_cache_dtype="auto")
    qkv = llm.engine.core.runner.model.model.layers[0].self_attn.qkv_proj
    assert torch.equal(qkv.weight.view(torch.uint8), weight) and torch.equal(qkv.weight_scale, scale)
    llm.shutdown()
    assert at_load == stored


def test_awq_checkpoint_matches_dequantized_reference(checkpoints: Callable[[str], Path]) -> None:
    """AutoAWQ's GEMM format (outputs interleaved in their words, zero points as stored) in the
    4-bit layers: HF's tokens over the dequantized weights; two TP ranks (QKV / gate-up split by
    whole words of outputs, O / down by whole groups of inputs) give the same tokens as one."""
    folder = checkpoints("awq")
    tokens, llm = engine_tokens(folder)
    assert llm.engine.config.quantization == "awq"
    qkv = llm.engine.core.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.linear_method.awq is not None and qkv.wna16.segments[0].weight.offsets is not None
    llm.shutdown()
    assert tokens == reference_tokens(folder.parent / "awq-ref", fake_quant_fp8=False)
    two, llm = engine_tokens(folder, tensor_parallel_size=2)
    llm.shutdown()
    assert two == tokens


@pytest.mark.parametrize("kind", ["ct-w4a16", "ct-w4a16-asym", "ct-w8a16", "ct-w4a16-act", "ct-w4a16-head"])
def test_compressed_tensors_int_checkpoint_matches_dequantized_reference(
    checkpoints: Callable[[str], Path], kind: str
) -> None:
    """llm-compressor's W4A16 / W8A16 (``pack-quantized``: symmetric groups of 32, asymmetric,
    8-bit per channel, asymmetric act-order ``group``, the LM head quantized too where ``ignore``
    leaves it) in the 4-bit layers: HF's tokens over the dequantized weights; the packed words are
    our layout as they are (4 bits, symmetric)."""
    folder = checkpoints(kind)
    tokens, llm = engine_tokens(folder)
    assert llm.engine.config.quantization == "compressed-tensors"
    qkv = llm.engine.core.runner.model.model.layers[0].self_attn.qkv_proj
    segment = qkv.wna16.segments[0]
    assert qkv.linear_method.ct is not None
    assert (segment.weight.offsets is None) == (kind in ("ct-w4a16", "ct-w8a16", "ct-w4a16-head"))
    head = llm.engine.core.runner.model.lm_head
    assert isinstance(head.linear_method, WnA16LinearMethod) == kind.endswith("-head")
    assert (segment.perm is not None) == kind.endswith("-act")
    if kind == "ct-w4a16":
        from safetensors.torch import load_file

        ckpt = load_file(str(folder / "model.safetensors"))
        words = torch.cat([ckpt[f"model.layers.0.self_attn.{p}.weight_packed"]
                           for p in ("q_proj", "k_proj", "v_proj")])
        assert torch.equal(segment.weight.qweight.cpu(), words.view(torch.uint8))
    llm.shutdown()
    assert tokens == reference_tokens(folder.parent / f"{kind}-ref", fake_quant_fp8=False)


def test_compressed_tensors_two_tensor_parallel_ranks_equal_one(checkpoints: Callable[[str], Path]) -> None:
    """TP=2 over gloo: QKV / gate-up split by output rows (zero points 8 per word), O / down by
    whole words and groups of inputs; ``quantization="compressed-tensors"`` (vLLM's name) serves
    compressed-tensors fp8 checkpoints as fp8 too."""
    folder = checkpoints("ct-w4a16-asym")
    one, llm = engine_tokens(folder, quantization="compressed-tensors")
    llm.shutdown()
    two, llm = engine_tokens(folder, tensor_parallel_size=2)
    llm.shutdown()
    assert two == one
    _, llm = engine_tokens(checkpoints("ct-channel"), quantization="compressed-tensors")
    assert llm.engine.config.quantization == "fp8"
    llm.shutdown()


def test_gptq_two_tensor_parallel_ranks_equal_one(checkpoints: Callable[[str], Path]) -> None:
    """TP=2 over gloo: QKV / gate-up split by GPTQ columns (and packed zero points, 8 per
    word), O / down by whole groups of K: the same tokens as one rank."""
    folder = checkpoints("gptq-asym")
    one, llm = engine_tokens(folder)
    llm.shutdown()
    two, llm = engine_tokens(folder, tensor_parallel_size=2)
    llm.shutdown()
    assert two == one


@pytest.mark.parametrize("kind", ["at-load", "ct-channel"])
def test_fp8_two_tensor_parallel_ranks(checkpoints: Callable[[str], Path], llama: Path, kind: str) -> None:
    """TP=2 over gloo, fp8 weights quantized at load (a row-parallel row's scale is the
    all-reduced maximum over both ranks' columns) or pre-quantized (rows and scales sliced).
    The weights are those of one rank; the activations of a row-parallel layer are quantized by
    each rank over its own slice (as vLLM does), a different rounding than one rank's, which
    changes greedy tokens of this tiny random model after a few steps. So the check is exact
    against the reference that quantizes those inputs in two slices."""
    folder, extra = (llama, {"quantization": "fp8"}) if kind == "at-load" else (checkpoints(kind), {})
    two, llm = engine_tokens(folder, tensor_parallel_size=2, **extra)
    llm.shutdown()
    # Quantized at load, the weights are the per-channel checkpoint's: one dense reference for both.
    reference = checkpoints("ct-channel").parent / "ct-channel-ref"
    assert two == reference_tokens(reference, fake_quant_fp8=True, tp=2)


def test_refusals(checkpoints: Callable[[str], Path], llama: Path) -> None:
    with pytest.raises(ValueError, match="gptq-quantized"):
        LLM(model=str(checkpoints("gptq-sym")), quantization="fp8", **ENGINE)
    with pytest.raises(ValueError, match="needs a GPTQ checkpoint"):
        LLM(model=str(llama), quantization="gptq", **ENGINE)
    with pytest.raises(ValueError, match="serves a .gguf file"):
        LLM(model=str(llama), quantization="gguf", **ENGINE)
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(model=str(llama), quantization="bnb", **ENGINE)
    with pytest.raises(ValueError, match="'awq' needs a checkpoint in that format"):
        LLM(model=str(llama), quantization="awq", **ENGINE)
    with pytest.raises(ValueError, match="'compressed-tensors' needs a checkpoint in that format"):
        LLM(model=str(llama), quantization="compressed-tensors", **ENGINE)
    with pytest.raises(ValueError, match="compressed-tensors-quantized"):
        LLM(model=str(checkpoints("ct-w4a16")), quantization="gptq", **ENGINE)
