"""The same tokens whatever the path: prefix hit vs cold, chunked vs whole prefill, preemption vs
ample KV, 32 together vs one at a time, each with synchronous and with async scheduling; no KV
block leaks after finish, abort or preemption."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu_worker import LLM, SamplingParams
from tests.gpu_worker.engine.engine_helpers import PROMPTS

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def token_ids(outputs: list[Any]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_no_leaks(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks and stats.kv_usage == 0.0


@pytest.fixture(scope="module")
def llama_dir(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("llama")


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request: pytest.FixtureRequest) -> bool:
    """Each path with the engine core waiting for every step, and planning one step ahead."""
    return bool(request.param)


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> tuple[LLM, list[list[int]]]:
    """An LLM with an ample pool and no prefix caching, and its greedy tokens for PROMPTS."""
    llm = LLM(model=str(llama_dir), num_kv_blocks=256, max_num_seqs=32, enable_prefix_caching=False)
    return llm, token_ids(llm.generate(PROMPTS, GREEDY))


def test_prefix_cache_hit_equals_cold(
    llama_dir: Path, reference: tuple[LLM, list[list[int]]], async_scheduling: bool
) -> None:
    llm = LLM(model=str(llama_dir), num_kv_blocks=256, max_num_seqs=32, async_scheduling=async_scheduling)
    long_prompt = PROMPTS[2]  # several full blocks
    (cold,) = llm.generate(long_prompt, GREEDY)
    assert cold.num_cached_tokens == 0
    (hit,) = llm.generate(long_prompt, GREEDY)
    assert hit.num_cached_tokens > 0 and hit.num_cached_tokens % 16 == 0
    assert hit.outputs[0].token_ids == cold.outputs[0].token_ids == reference[1][2]
    # A hit on the prompt plus part of an earlier output (blocks cached during decode).
    extended = cold.prompt_token_ids + cold.outputs[0].token_ids[:20]
    (ext,) = llm.generate(extended, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert ext.num_cached_tokens > hit.num_cached_tokens
    assert ext.outputs[0].token_ids == cold.outputs[0].token_ids[20:24]
    assert llm.engine.stats().prefix_cache_hits > 0
    assert_no_leaks(llm)


def test_chunked_prefill_equals_whole(
    llama_dir: Path, reference: tuple[LLM, list[list[int]]], async_scheduling: bool
) -> None:
    llm = LLM(
        model=str(llama_dir), num_kv_blocks=256, max_num_batched_tokens=7, enable_prefix_caching=False,
        async_scheduling=async_scheduling,
    )
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == reference[1]
    assert_no_leaks(llm)


def test_preemption_equals_ample_pool(
    llama_dir: Path, reference: tuple[LLM, list[list[int]]], async_scheduling: bool
) -> None:
    # 8 blocks: 128 tokens for ~120 prompt + 120 output tokens.
    llm = LLM(model=str(llama_dir), num_kv_blocks=8, max_num_seqs=32, async_scheduling=async_scheduling)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == reference[1]
    assert llm.engine.stats().num_preemptions > 0
    assert_no_leaks(llm)


def test_32_together_equal_one_at_a_time(reference: tuple[LLM, list[list[int]]]) -> None:
    llm = reference[0]
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    together = token_ids(llm.generate(prompts, params))
    assert together == [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]
    assert_no_leaks(llm)


def test_abort_and_stop_string_free_blocks(llama_dir: Path, reference: tuple[LLM, list[list[int]]]) -> None:
    llm, expected = reference
    engine = llm.engine
    engine.add_request("a", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=50))
    engine.add_request("b", PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=50, n=2))
    for _ in range(3):
        engine.step()
    assert engine.stats().kv_usage > 0
    engine.abort_request(["a", "b"])
    assert not engine.has_unfinished_requests()
    assert_no_leaks(llm)
    # A stop string found by the front aborts the request in the core at once.
    (full,) = llm.generate(PROMPTS[2], GREEDY)
    stop = full.outputs[0].text[5:9]
    engine.add_request("s", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]))
    outs: list[Any] = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "stop"
    assert_no_leaks(llm)
