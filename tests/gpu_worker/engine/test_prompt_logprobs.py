"""Prompt logprobs (``SamplingParams.prompt_logprobs``) against HF transformers' log-softmax of
the prompt (float32, CPU), and the same values through every scheduler path: chunked prefill,
a warm prefix cache (not used by such a request), preemption, async scheduling, ``n > 1`` and
a streamed (delta) request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_worker import LLM, SamplingParams
from gpu_worker.config import EngineConfig
from gpu_worker.engine.async_llm import AsyncLLM
from gpu_worker.outputs import RequestOutput
from tests.gpu_worker.engine.engine_helpers import PROMPTS
from tests.helpers.tiny_models import FAMILIES

TOP = 3


def hf_prompt_logprobs(model: Any, prompt_ids: list[int]) -> torch.Tensor:
    """HF's log-softmax at each prompt position but the last, ``[len - 1, vocab]``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def assert_matches_hf(output: RequestOutput, reference: torch.Tensor, top: int) -> None:
    """vLLM's shape (None first, then the prompt token and ``top`` alternatives per position),
    each value, rank and alternative as HF's."""
    ids = output.prompt_token_ids
    prompt_logprobs = output.prompt_logprobs
    assert prompt_logprobs is not None and len(prompt_logprobs) == len(ids)
    assert prompt_logprobs[0] is None
    for pos in range(1, len(ids)):
        entry = prompt_logprobs[pos]
        assert entry is not None
        row = reference[pos - 1]
        token = ids[pos]
        chosen = entry[token]
        value = float(row[token])
        assert chosen.logprob == pytest.approx(value, abs=1e-4)
        # Random tiny models have near-ties in 49k logits: a rank within the float noise.
        low, high = int((row > value + 1e-4).sum()) + 1, int((row > value - 1e-4).sum()) + 1
        assert low <= (chosen.rank or 0) <= high
        in_top = [lp for t, lp in entry.items() if not (t == token and lp.rank not in range(1, top + 1))]
        ranked = sorted(in_top, key=lambda lp: lp.rank or 0)
        assert len(ranked) == top and [lp.rank for lp in ranked] == list(range(1, top + 1))
        assert [lp.logprob for lp in ranked] == pytest.approx(row.topk(top).values.tolist(), abs=1e-4)


def assert_same_prompt_logprobs(got: RequestOutput, want: RequestOutput) -> None:
    """Two paths' prompt logprobs: the same positions, the prompt tokens' values (within float
    noise: chunks of other sizes reduce in another order), and the same top values."""
    a, b = got.prompt_logprobs, want.prompt_logprobs
    assert a is not None and b is not None and len(a) == len(b) and a[0] is None and b[0] is None
    worst = 0.0
    for pos, (x, y) in enumerate(zip(a[1:], b[1:], strict=True), start=1):
        assert x is not None and y is not None
        token = got.prompt_token_ids[pos]
        worst = max(worst, abs(x[token].logprob - y[token].logprob))
        top_x = sorted(lp.logprob for lp in x.values() if lp.rank is not None and lp.rank <= len(x) - 1)
        top_y = sorted(lp.logprob for lp in y.values() if lp.rank is not None and lp.rank <= len(y) - 1)
        assert top_x == pytest.approx(top_y, abs=1e-4)
    assert worst < 1e-4, worst


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_logprobs_match_hf(
    family: str, tiny_model: Callable[[str], Path], hf_model: Callable[[Path], Any]
) -> None:
    path = tiny_model(family)
    ref = hf_model(path)
    with LLM(model=str(path), num_kv_blocks=64, max_num_seqs=8) as llm:
        params = [SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=TOP),
                  SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0),
                  SamplingParams(temperature=0.0, max_tokens=2)]
        outputs = llm.generate(PROMPTS[1:4], params)
    for output, p in zip(outputs, params, strict=True):
        if p.prompt_logprobs is None:
            assert output.prompt_logprobs is None
            continue
        assert_matches_hf(output, hf_prompt_logprobs(ref, output.prompt_token_ids), p.prompt_logprobs)


def test_a_one_token_prompt_has_only_the_leading_none(tiny_model: Callable[[str], Path]) -> None:
    with LLM(model=str(tiny_model("llama")), num_kv_blocks=16, skip_tokenizer_init=True) as llm:
        (output,) = llm.generate([[42]], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2))
    assert output.prompt_logprobs == [None]


def test_every_scheduler_path_gives_the_plain_paths_values(tiny_model: Callable[[str], Path]) -> None:
    """A 5-token budget chunks each prompt; the first prompt served first fills the prefix cache,
    which a request asking for prompt logprobs does not use; a 6-block pool preempts; n=2 puts
    them once on the request; async scheduling and the plain loop agree."""
    path = str(tiny_model("llama"))
    prompts = [[(11 * i + 7 * j) % 3000 + 5 for j in range(29 + 6 * i)] for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=2)
    with LLM(model=path, num_kv_blocks=256, skip_tokenizer_init=True, async_scheduling=False) as llm:
        plain = llm.generate(prompts, params)
    for engine in (
        dict(num_kv_blocks=6, max_num_batched_tokens=5, async_scheduling=False),
        dict(num_kv_blocks=6, max_num_batched_tokens=5, async_scheduling=True),
    ):
        with LLM(model=path, skip_tokenizer_init=True, max_num_seqs=3, block_size=16, **engine) as llm:
            for _ in range(2):  # the second finds the first prompt's blocks cached
                (warm,) = llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=1))
            assert warm.num_cached_tokens >= 16 and warm.prompt_logprobs is None
            outputs = llm.generate(prompts, params)
            for got, want in zip(outputs, plain, strict=True):
                assert_same_prompt_logprobs(got, want)
            assert all(o.num_cached_tokens == 0 for o in outputs)
            assert llm.engine.stats().num_preemptions > 0, engine
            (fanned,) = llm.generate(prompts[:1], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=3,
                                                                  prompt_logprobs=2))
            assert len(fanned.outputs) == 2
            assert_same_prompt_logprobs(fanned, plain[0])
            stats = llm.engine.stats()
            assert (stats.num_running, stats.num_waiting) == (0, 0)
            assert stats.num_free_blocks == stats.num_total_blocks


def test_a_stream_carries_them_once_with_the_first_token(tiny_model: Callable[[str], Path]) -> None:
    path = str(tiny_model("llama"))
    prompt = [(5 * j) % 2000 + 3 for j in range(21)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=1)
    with LLM(model=path, num_kv_blocks=32, skip_tokenizer_init=True) as llm:
        (whole,) = llm.generate([prompt], params)

    async def stream() -> list[RequestOutput]:
        # The engine core in a child process: its outputs cross a pipe packed (PackedOutputs).
        engine = AsyncLLM.from_config(EngineConfig(
            model=path, num_kv_blocks=32, skip_tokenizer_init=True, engine_core_process=True,
        ))
        try:
            return [out async for out in engine.generate(prompt, params, "r1")]
        finally:
            await engine.shutdown()

    chunks = asyncio.run(stream())
    carrying = [i for i, c in enumerate(chunks) if c.prompt_logprobs is not None]
    assert carrying == [0] and chunks[0].outputs[0].token_ids
    assert_same_prompt_logprobs(chunks[0], whole)
