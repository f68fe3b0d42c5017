"""Tiny random HF models saved with ``save_pretrained``, one per family we serve.

Tests use the session fixtures of ``tests/conftest.py`` (``tiny_model(family)``, built once per
family and shared by every area); direct use, as in the benchmarks::

    tok_dir = save_smollm2_tokenizer(tmp / "tok", smollm2_gguf)   # once per session (~4 s)
    model_dir = make_tiny_model("qwen3", tmp / "qwen3", tokenizer_dir=tok_dir)

Every model has 2 layers, hidden 64, 4 query heads / 2 KV heads and the SmolLM2 vocabulary
(49152), and a copy of the tokenizer next to it. Weights use ``initializer_range=0.1``, biases
and norm scales are randomized too (so loading them is tested), which keeps greedy argmax
margins far above float32 noise.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

VOCAB_SIZE = 49152
EOS_TOKEN_ID = 2  # SmolLM2's <|im_end|>

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=EOS_TOKEN_ID,
    pad_token_id=EOS_TOKEN_ID,
)


def _llama(**extra: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**{**_COMMON, **extra})


def _config_llama() -> Any:
    # llama3 rope scaling with a short original length, so the scaled band is really exercised.
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    return _llama(rope_parameters=rope, tie_word_embeddings=False)


def _config_llama_tied() -> Any:
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    return _llama(rope_parameters=rope, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)


def _config_mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(**{**_COMMON, "head_dim": 32, "sliding_window": None, "tie_word_embeddings": False})


def _config_qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**{**_COMMON, "tie_word_embeddings": True, "use_sliding_window": False})


def _config_qwen3() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        **{**_COMMON, "head_dim": 32, "tie_word_embeddings": False, "use_sliding_window": False}
    )


# family -> config builder; "llama" uses llama3 rope scaling, "llama_tied" linear scaling + biases.
FAMILIES: MappingProxyType[str, Callable[[], Any]] = MappingProxyType(
    {
        "llama": _config_llama,
        "llama_tied": _config_llama_tied,
        "mistral": _config_mistral,
        "qwen2": _config_qwen2,
        "qwen3": _config_qwen3,
    }
)


def load_smollm2_tokenizer(gguf_file: Path) -> Any:
    """The SmolLM2 tokenizer (byte-level BPE), converted by transformers from its GGUF (~4 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def save_smollm2_tokenizer(dst: Path, gguf_file: Path) -> Path:
    """Convert the SmolLM2 tokenizer from its GGUF and save it into ``dst`` (do it once per session)."""
    tokenizer = load_smollm2_tokenizer(gguf_file)
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dst)
    return dst


def make_tiny_config(family: str) -> Any:
    """The HF config of one tiny family (see :data:`FAMILIES`)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {list(FAMILIES)}")
    return FAMILIES[family]()


def make_tiny_model(
    family: str,
    dst: Path,
    *,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    max_shard_size: str | None = None,
    **shape: Any,
) -> Path:
    """Build a random model of ``family``, ``save_pretrained`` it (safetensors) into ``dst``.

    ``tokenizer_dir``: a saved tokenizer whose files are copied next to the model.
    ``max_shard_size`` (e.g. ``"1MB"``) writes a sharded checkpoint with its index json.
    ``shape``: config fields to change (``hidden_size=512``, ...) for a larger model.
    """
    from transformers import AutoModelForCausalLM

    config = make_tiny_config(family)
    for name, value in shape.items():
        setattr(config, name, value)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, 0.1)
                elif "norm" in name:
                    param.normal_(1.0, 0.1)
    dst.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(dst, **kwargs)
    if tokenizer_dir is not None:
        for file in Path(tokenizer_dir).iterdir():
            if file.is_file():
                shutil.copy(file, dst / file.name)
    return dst
