"""On a GPU: prompt logprobs through CUDA graphs (steps mixing prompt chunks with decodes
replay piecewise graphs; decode-only steps the decode graphs) equal the eager engine's, and
agree with the logprobs of the tokens a greedy request generated from the same context."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest

from gpu_worker import LLM, SamplingParams
from gpu_worker.outputs import RequestOutput
from tests.gpu_worker.engine.engine_helpers import gpu_llama_config

pytestmark = pytest.mark.gpu

BF16_TOL = 3e-2  # bf16 logits of the same weights in batches of other shapes


def _chosen(output: RequestOutput) -> list[float]:
    assert output.prompt_logprobs is not None and output.prompt_logprobs[0] is None
    values = []
    for pos, entry in enumerate(output.prompt_logprobs[1:], start=1):
        assert entry is not None
        values.append(entry[output.prompt_token_ids[pos]].logprob)
    return values


def test_prompt_logprobs_through_cuda_graphs_equal_eager(tmp_path: Path) -> None:
    folder = gpu_llama_config(tmp_path / "llama")
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 32000) for _ in range(rng.randrange(2, 700))] for _ in range(12)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=5),
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),  # decodes in the same steps
    ] * 6
    results = []
    for eager in (True, False):
        llm = LLM(model=str(folder), load_format="dummy", gpu_memory_utilization=0.2, enforce_eager=eager,
                  max_num_batched_tokens=512)
        results.append(llm.generate(prompts, params))
        del llm
        gc.collect()
    for eager_out, graphed_out, p in zip(*results, params, strict=True):
        if p.prompt_logprobs is None:
            assert eager_out.prompt_logprobs is None and graphed_out.prompt_logprobs is None
            continue
        assert _chosen(graphed_out) == pytest.approx(_chosen(eager_out), abs=BF16_TOL)
        assert all(len(e) <= 6 for e in graphed_out.prompt_logprobs[1:] if e is not None)


def test_prompt_logprobs_agree_with_generated_logprobs(tmp_path: Path) -> None:
    """A greedy request's logprobs of its own tokens are the prompt logprobs of a request whose
    prompt is its prompt followed by those tokens."""
    folder = gpu_llama_config(tmp_path / "llama")
    rng = random.Random(3)
    prompt = [rng.randrange(3, 32000) for _ in range(300)]
    llm = LLM(model=str(folder), load_format="dummy", gpu_memory_utilization=0.2)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
    (gen,) = llm.generate([prompt], greedy)
    tokens = gen.outputs[0].token_ids
    assert gen.outputs[0].logprobs is not None
    generated = [entry[t].logprob for entry, t in zip(gen.outputs[0].logprobs, tokens, strict=True)]
    (scored,) = llm.generate([prompt + tokens], SamplingParams(max_tokens=1, prompt_logprobs=0))
    assert _chosen(scored)[len(prompt) - 1:] == pytest.approx(generated, abs=BF16_TOL)
    assert scored.prompt_logprobs is not None
    ranks = [scored.prompt_logprobs[len(prompt) + i][t].rank for i, t in enumerate(tokens)]  # type: ignore[index]
    assert ranks.count(1) >= len(tokens) - 2  # greedy tokens: rank 1 but for near-ties in bf16
