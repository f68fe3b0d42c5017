"""LLM end to end on tiny random models of each family, against HF transformers (float32, CPU)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu_worker import LLM, SamplingParams
from tests.gpu_worker.engine.engine_helpers import PROMPTS, hf_greedy, hf_token_logprobs
from tests.helpers.tiny_models import FAMILIES

MAX_TOKENS = 12


@pytest.fixture(scope="session")
def tiny_llm(tiny_model: Callable[[str], Path]) -> Callable[[str], LLM]:
    """``tiny_llm(family)`` -> an LLM over that family's tiny model (built once)."""
    built: dict[str, LLM] = {}

    def get(family: str) -> LLM:
        if family not in built:
            built[family] = LLM(model=str(tiny_model(family)), num_kv_blocks=128, max_num_seqs=32)
        return built[family]

    return get


def assert_no_leaks(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks and stats.kv_usage == 0.0


@pytest.fixture(params=list(FAMILIES))
def llm_and_hf(
    request: pytest.FixtureRequest,
    tiny_llm: Callable[[str], LLM],
    tiny_model: Callable[[str], Path],
    hf_model: Callable[[Path], Any],
) -> tuple[LLM, Any]:
    """One family at a time: our LLM over its tiny model and the HF reference of that model."""
    return tiny_llm(request.param), hf_model(tiny_model(request.param))


def test_greedy_matches_hf_generate(llm_and_hf: tuple[LLM, Any]) -> None:
    llm, ref = llm_and_hf
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = llm.generate(PROMPTS, params)  # all submitted together
    assert [o.prompt for o in outputs] == PROMPTS
    for output in outputs:
        expected = hf_greedy(ref, output.prompt_token_ids, MAX_TOKENS)
        completion = output.outputs[0]
        assert completion.token_ids == expected, output.prompt
        assert output.finished
        assert completion.finish_reason == ("length" if len(expected) == MAX_TOKENS else "stop")
    assert_no_leaks(llm)


def test_logprobs_match_hf_log_softmax(llm_and_hf: tuple[LLM, Any]) -> None:
    llm, ref = llm_and_hf
    params = [
        SamplingParams(temperature=0.0, max_tokens=6, logprobs=3),
        SamplingParams(temperature=1.0, seed=5, max_tokens=6, logprobs=0),  # sampled: raw logprobs too
    ]
    outputs = llm.generate(PROMPTS[1:3], params)
    for output, p in zip(outputs, params, strict=True):
        completion = output.outputs[0]
        expected = hf_token_logprobs(ref, output.prompt_token_ids, completion.token_ids)
        assert completion.logprobs is not None and len(completion.logprobs) == len(completion.token_ids)
        for token_id, entry, ref_lp in zip(completion.token_ids, completion.logprobs, expected, strict=True):
            assert entry[token_id].logprob == pytest.approx(ref_lp, abs=1e-4)
            assert len(entry) <= 1 + (p.logprobs or 0)
            if p.greedy:
                assert entry[token_id].rank == 1
        assert completion.cumulative_logprob == pytest.approx(sum(expected), abs=1e-3)
