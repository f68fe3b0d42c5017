"""Shared data and HF reference helpers of the engine-front tests (imported by the test modules)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Prompts of different lengths (1 to 3+ KV blocks of 16 tokens with the SmolLM2 tokenizer).
PROMPTS = [
    "Hi",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a small dragon who loved to read books "
    "about the stars and the sea.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,",
    "def fibonacci(n):\n    ",
]


def hf_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF ``generate`` greedy continuation (stops at EOS like the engine)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


def hf_token_logprobs(model: Any, prompt_ids: list[int], output_ids: list[int]) -> list[float]:
    """HF's log-softmax of each output token given everything before it."""
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids) - 1
    return [float(logprobs[start + i, t]) for i, t in enumerate(output_ids)]


def gpu_llama_config(path: Path) -> Path:
    """A folder with only the config of a 2-layer Llama of 1024 hidden units and a 32k vocabulary
    (``load_format="dummy"`` fills its weights): the GPU tests' model."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        vocab_size=32000, rope_theta=500000.0, max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=False, torch_dtype="bfloat16", hidden_act="silu", eos_token_id=2,
    )
    (path / "config.json").write_text(json.dumps(cfg))
    return path
