"""Beam search (vLLM's ``LLM.beam_search`` and ``use_beam_search``): the offline API's beams equal
HF transformers' ``num_beams`` search, token for token and in order, in float32; the serving
engine (``AsyncLLM``) finds the same beams, and a cancelled search aborts its requests and frees
every KV block; the algorithm's EOS, length-penalty and ranking rules on their own; what a served
request may not combine with beam search is refused naming the field."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_worker import LLM, BeamSearchParams, EngineConfig, Logprob, SamplingParams
from gpu_worker.beam_search import BeamSearch, BeamSearchSequence, beam_score, served_beam_params
from gpu_worker.engine.async_llm import AsyncLLM

PROMPTS = [[(13 * i + 5 * j) % 3000 + 11 for j in range(6 + 11 * i)] for i in range(3)]


def hf_beams(model: Any, prompt: list[int], width: int, steps: int) -> tuple[list[list[int]], list[float]]:
    """HF's ``width`` beams after ``steps`` tokens (no EOS before: ``min_new_tokens``), best first,
    and their summed log probabilities."""
    with torch.no_grad():
        mask = torch.ones(1, len(prompt), dtype=torch.long)
        out = model.generate(torch.tensor([prompt]), attention_mask=mask, num_beams=width,
                             num_return_sequences=width, do_sample=False, max_new_tokens=steps,
                             min_new_tokens=steps, early_stopping=False, length_penalty=1.0,
                             return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    beams = [[int(t) for t in seq[len(prompt):]] for seq in out.sequences]
    return beams, [float(s) * steps for s in out.sequences_scores]  # HF divides by the new tokens


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_offline_beams_equal_hf_beam_search(family: str, tiny_model: Callable[[str], Path],
                                            hf_model: Callable[[Path], Any]) -> None:
    model = tiny_model(family)
    params = BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True)
    with LLM(model=str(model), skip_tokenizer_init=True, num_kv_blocks=128) as llm:
        outputs = llm.beam_search(PROMPTS, params)
        stats = llm.engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        want, scores = hf_beams(hf_model(model), prompt, 4, 6)
        assert [list(b.output_token_ids) for b in output.sequences] == want
        assert [b.tokens[: len(prompt)] for b in output.sequences] == [tuple(prompt)] * 4  # vLLM's shape
        assert [b.cum_logprob for b in output.sequences] == pytest.approx(scores, abs=1e-4)
        assert all(b.finish_reason == "length" and len(b.logprobs) == 6 for b in output.sequences)


def test_the_serving_engine_finds_the_same_beams_and_a_cancel_frees_everything(
        tiny_model: Callable[[str], Path]) -> None:
    model = str(tiny_model("llama"))
    params = BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True)
    with LLM(model=model, skip_tokenizer_init=True, num_kv_blocks=128) as llm:
        [offline] = llm.beam_search(PROMPTS[1:2], params)
    engine = AsyncLLM.from_config(EngineConfig(model=model, skip_tokenizer_init=True, num_kv_blocks=128))

    async def run() -> None:
        ids, beams = await engine.beam_search(PROMPTS[1], params, "beam-1")
        assert ids == PROMPTS[1] and beams == offline.sequences
        long = BeamSearchParams(beam_width=3, max_tokens=60, ignore_eos=True)
        task = asyncio.ensure_future(engine.beam_search(PROMPTS[2], long, "beam-2"))
        await asyncio.sleep(0.3)  # some steps in
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            stats = engine.stats()
            idle = stats.num_running == stats.num_waiting == 0
            if idle and stats.num_free_blocks == stats.num_total_blocks:
                break
            await asyncio.sleep(0.02)
        assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0
        with pytest.raises(ValueError, match="must fit the model's context"):
            await engine.beam_search(PROMPTS[0], BeamSearchParams(beam_width=2, max_tokens=10**6), "beam-3")

    try:
        asyncio.run(run())
    finally:
        asyncio.run(engine.shutdown())


def _lp(**tokens: float) -> dict[int, Logprob]:
    return {int(t[1:]): Logprob(v, rank=i + 1) for i, (t, v) in enumerate(tokens.items())}


def test_eos_completes_a_beam_and_the_ranking_uses_the_length_penalty() -> None:
    eos = frozenset({2})
    search = BeamSearch([7, 7], BeamSearchParams(beam_width=2, max_tokens=3), eos)
    search.step([_lp(t2=-0.1, t5=-0.5, t6=-2.0)])  # EOS first: complete, the others live
    assert [b.tokens for b in search.completed] == [(7, 7, 2)] and search.completed[0].finish_reason == "stop"
    assert [b.tokens for b in search.live] == [(7, 7, 5), (7, 7, 6)]
    search.step([_lp(t8=-0.1, t9=-0.2), _lp(t8=-0.1)])
    assert [b.tokens[2:] for b in search.live] == [(5, 8), (5, 9)]  # the best two of three
    search.step([_lp(t3=-0.1), _lp(t3=-0.1)])
    assert search.done
    best = search.best()
    # the early EOS beam: -0.1 over 2 tokens (a final EOS is not counted); the others -0.7 over 5
    assert best[0].tokens == (7, 7, 2) and best[0].finish_reason == "stop"
    assert best[1].finish_reason == "length" and best[1].output_token_ids == (5, 8, 3)
    # a strong length penalty favors the long beams: -0.7 / 5**3 beats -0.1 / 2**3
    assert beam_score(best[1], eos, 3.0) > beam_score(best[0], eos, 3.0)
    rerun = BeamSearch([7, 7], BeamSearchParams(beam_width=2, max_tokens=1, ignore_eos=True), eos)
    rerun.step([_lp(t2=-0.1, t5=-0.5)])
    assert not rerun.completed and rerun.live[0].tokens == (7, 7, 2)  # ignore_eos: EOS is a token


def test_a_served_request_takes_only_what_beam_search_uses() -> None:
    plain = served_beam_params(SamplingParams(n=2, max_tokens=8, logprobs=3, temperature=0.7, seed=1), 4, 0.5)
    assert plain == BeamSearchParams(4, 8, ignore_eos=False, length_penalty=0.5)
    for bad, field in ((SamplingParams(stop=["x"]), "stop"),
                       (SamplingParams(presence_penalty=0.5), "presence"),
                       (SamplingParams(structured_output={"regex": "a+"}), "structured_output"),
                       (SamplingParams(min_tokens=2), "min_tokens")):
        with pytest.raises(ValueError, match=f"{field}.* is not served with beam search"):
            served_beam_params(bad, 4, 1.0)
    with pytest.raises(ValueError, match="at most the beam_width"):
        served_beam_params(SamplingParams(n=5), 4, 1.0)
    with pytest.raises(ValueError, match="beam_width must be in"):
        BeamSearchParams(beam_width=11, max_tokens=4)
    assert BeamSearchSequence((1, 2, 3), num_prompt_tokens=2).output_token_ids == (3,)
