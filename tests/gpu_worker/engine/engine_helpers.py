"""Shared data and HF reference helpers of the engine-front tests (imported by the test modules)."""

from __future__ import annotations

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
