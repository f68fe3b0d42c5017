"""Sampling through LLM: seeds, top_k=1, n > 1, stop strings; invalid input names the field."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from gpu_worker import LLM, SamplingParams
from tests.gpu_worker.engine.engine_helpers import PROMPTS


@pytest.fixture(scope="module")
def llm(tiny_model: Callable[[str], Path]) -> LLM:
    return LLM(model=str(tiny_model("qwen3")), num_kv_blocks=128, max_model_len=96, max_num_seqs=32)


def test_seeded_sampling_reproducible_and_batch_independent(llm: LLM) -> None:
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=100, seed=1234, max_tokens=16, ignore_eos=True)
    (alone,) = llm.generate(PROMPTS[1], seeded)
    others = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 3
    batch = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[1]], [others[0], seeded, *others[1:]])
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids
    other_seed = dataclasses.replace(seeded, seed=99)
    assert llm.generate(PROMPTS[1], other_seed)[0].outputs[0].token_ids != alone.outputs[0].token_ids


def test_top_k_1_equals_greedy(llm: LLM) -> None:
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=10))
    top1 = llm.generate(PROMPTS, SamplingParams(temperature=1.3, top_k=1, max_tokens=10))
    assert [o.outputs[0].token_ids for o in top1] == [o.outputs[0].token_ids for o in greedy]


def test_n_samples(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    (out,) = llm.generate(PROMPTS[1], params)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    (again,) = llm.generate(PROMPTS[1], params)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    single = SamplingParams(temperature=1.0, seed=8, max_tokens=8, ignore_eos=True)
    assert llm.generate(PROMPTS[1], single)[0].outputs[0].token_ids == out.outputs[1].token_ids


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundary(llm: LLM, include: bool) -> None:
    (full,) = llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    tok = llm.get_tokenizer()
    ids, text = full.outputs[0].token_ids, full.outputs[0].text
    # A stop string that straddles the boundary between output tokens 3 and 4.
    boundary = len(tok.decode(ids[:4]))
    stop = text[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and text.find(stop) == boundary - 2
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=[stop], include_stop_str_in_output=include)
    (cut,) = llm.generate(PROMPTS[2], params)
    c = cut.outputs[0]
    assert c.text == text[: boundary - 2] + (stop if include else "")
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    assert c.token_ids == ids[:5]


@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("prompt", lambda: ("", SamplingParams())),
        ("prompt", lambda: ("word " * 120, SamplingParams())),
        ("prompt_token_ids", lambda: ([1] * 96, SamplingParams())),
        ("prompt_token_ids", lambda: ([1, 49152], SamplingParams())),
        ("max_tokens", lambda: ("x", SamplingParams(max_tokens=0))),
        ("temperature", lambda: ("x", SamplingParams(temperature=-0.5))),
        ("top_p", lambda: ("x", SamplingParams(top_p=0.0))),
        ("top_p", lambda: ("x", SamplingParams(top_p=1.5))),
        ("n", lambda: ("x", SamplingParams(n=0))),
    ],
)
def test_invalid_input_names_the_field_and_engine_keeps_serving(llm: LLM, field: str, make: Callable) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        prompt, params = make()
        llm.generate(["fine", prompt], params)
    (ok,) = llm.generate("fine", SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(ok.outputs[0].token_ids) == 3
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and not llm.engine.has_unfinished_requests()
