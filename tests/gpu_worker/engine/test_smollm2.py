"""SmolLM2-135M from its GGUF (``LLM(model="smollm2-135m")``) against HF loaded from the same file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_worker import LLM, SamplingParams
from tests.gpu_worker.engine.engine_helpers import hf_greedy, hf_token_logprobs

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def smollm2_llm() -> LLM:
    return LLM(model="smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


def test_greedy_and_logprobs_match_hf(smollm2_llm: LLM, smollm2_hf: Any) -> None:
    chat = smollm2_llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompts = ["The quick brown fox", "def add(a, b):\n", chat]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1)
    outputs = smollm2_llm.generate(prompts, params)
    for output in outputs:
        completion = output.outputs[0]
        assert completion.token_ids == hf_greedy(smollm2_hf, output.prompt_token_ids, MAX_TOKENS)
        expected = hf_token_logprobs(smollm2_hf, output.prompt_token_ids, completion.token_ids)
        assert completion.logprobs is not None
        got = [entry[t].logprob for t, entry in zip(completion.token_ids, completion.logprobs, strict=True)]
        assert got == pytest.approx(expected, abs=1e-4)
    assert "Paris" in outputs[2].outputs[0].text


def test_chat_api(smollm2_llm: LLM) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    (single,) = smollm2_llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=8))
    both = smollm2_llm.chat([messages, messages], SamplingParams(temperature=0.0, max_tokens=8))
    assert [o.outputs[0].token_ids for o in both] == [single.outputs[0].token_ids] * 2
    assert single.prompt is not None and single.prompt.endswith("<|im_start|>assistant\n")
    assert both[1].num_cached_tokens > 0  # the second identical conversation hit the prefix cache
