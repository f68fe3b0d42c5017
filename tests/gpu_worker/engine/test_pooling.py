"""A pooling engine (``runner="pooling"``): each prompt's embedding is its last token's final
hidden state, L2-normalized, as HF transformers computes it (float32, CPU), through chunked
prefill, a prefix-cache hit, the engine core in a child process, and tensor / pipeline ranks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_worker import LLM
from gpu_worker.config import EngineConfig

PROMPTS = [[(17 * i + 3 * j) % 3000 + 9 for j in range(5 + 13 * i)] for i in range(4)] + [[42]]


def hf_embeddings(model: Any, prompts: list[list[int]]) -> list[torch.Tensor]:
    """HF's last hidden state (after the final norm) at each prompt's last token, normalized."""
    out = []
    for ids in prompts:
        with torch.no_grad():
            hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1].float()
        out.append(torch.nn.functional.normalize(hidden, dim=-1))
    return out


def assert_close(got: list[Any], want: list[torch.Tensor]) -> None:
    for output, ref in zip(got, want, strict=True):
        assert output.embedding is not None and len(output.embedding) == ref.numel()
        vector = torch.tensor(output.embedding)
        assert torch.allclose(vector, ref, atol=1e-4), (vector - ref).abs().max()
        assert vector.norm().item() == pytest.approx(1.0, abs=1e-5)
        assert output.finished


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_embeddings_match_hf(family: str, tiny_model: Callable[[str], Path],
                             hf_model: Callable[[Path], Any]) -> None:
    path = tiny_model(family)
    ref = hf_embeddings(hf_model(path), PROMPTS)
    # A 16-token budget chunks the longer prompts; the repeat hits the prefix cache.
    with LLM(model=str(path), runner="pooling", skip_tokenizer_init=True, num_kv_blocks=64,
             max_num_batched_tokens=16) as llm:
        assert_close(llm.embed(PROMPTS), ref)
        again = llm.embed(PROMPTS[3:4])
        assert again[0].num_cached_tokens >= 16
        assert_close(again, ref[3:4])
        stats = llm.engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks


def test_a_generating_engine_refuses_to_embed(tiny_model: Callable[[str], Path]) -> None:
    with LLM(model=str(tiny_model("llama")), skip_tokenizer_init=True, num_kv_blocks=16) as llm:
        with pytest.raises(ValueError, match='runner="pooling"'):
            llm.embed([[1, 2]])
    with pytest.raises(ValueError, match="speculative_config needs runner generate"):
        EngineConfig(model="x", runner="pooling",
                     speculative_config={"method": "ngram", "num_speculative_tokens": 2})


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_sharded_embeddings_match_hf(tiny_model: Callable[[str], Path], hf_model: Callable[[Path], Any],
                                     tp: int, pp: int) -> None:
    path = tiny_model("qwen3")
    with LLM(model=str(path), runner="pooling", skip_tokenizer_init=True, num_kv_blocks=64,
             tensor_parallel_size=tp, pipeline_parallel_size=pp, max_num_batched_tokens=16) as llm:
        assert_close(llm.embed(PROMPTS), hf_embeddings(hf_model(path), PROMPTS))


def test_the_engine_core_process_returns_embeddings(tiny_model: Callable[[str], Path],
                                                    hf_model: Callable[[Path], Any]) -> None:
    """Through AsyncLLM with the core in a child process (outputs cross a pipe packed)."""
    import asyncio

    from gpu_worker.engine.async_llm import AsyncLLM

    path = tiny_model("qwen3")

    async def embed() -> list[Any]:
        config = EngineConfig(model=str(path), runner="pooling", skip_tokenizer_init=True, num_kv_blocks=32,
                              engine_core_process=True)
        engine = AsyncLLM.from_config(config)
        try:
            finals = []
            for i, prompt in enumerate(PROMPTS[:2]):
                outputs = [o async for o in engine.generate(prompt, None, f"r{i}")]
                finals.append(outputs[-1])
            return finals
        finally:
            await engine.shutdown()

    assert_close(asyncio.run(embed()), hf_embeddings(hf_model(path), PROMPTS[:2]))
