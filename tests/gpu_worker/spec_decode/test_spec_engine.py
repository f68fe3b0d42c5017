"""Speculative decoding end to end on tiny models: greedy tokens equal plain decoding's through
prefix hits, chunked prefill and preemption, for the n-gram and the draft-model methods, with
and without async scheduling; sampling features (logprobs, penalties, min_tokens, stop ids,
bias, n > 1, seeds, structured output) behave as without drafts; no KV block leaks, in the
target's pool or the draft's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_worker import LLM, SamplingParams
from gpu_worker.spec_decode.draft_model import DraftModelProposer

# As tests/gpu_worker/distributed/test_parallel_engine.py: the first prompt alone, then all
# four: its cached blocks are hit; 12 blocks (192 tokens) for four 40-token prompts growing by
# 24: preemption; 24 tokens per step: chunked prefill. Prompts repeat a 9-token cycle, so
# n-gram lookup finds drafts.
ENGINE: dict[str, Any] = dict(
    skip_tokenizer_init=True, num_kv_blocks=12, max_num_seqs=4, max_num_batched_tokens=24,
    max_model_len=160, enforce_eager=True,
)
PROMPTS = [[10 + (j % 9) * 3 + i for j in range(40)] for i in range(4)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def ngram(k: int = 3) -> dict[str, Any]:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def draft_model(path: Path, k: int = 3) -> dict[str, Any]:
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k}


def run(llm: LLM) -> tuple[list[list[int]], dict[str, int]]:
    first = llm.generate(PROMPTS[:1], GREEDY)
    outs = llm.generate(PROMPTS, GREEDY)
    stats = llm.engine.stats()
    seen = {"preemptions": stats.num_preemptions, "cached": outs[0].num_cached_tokens}
    return [list(o.outputs[0].token_ids) for o in [*first, *outs]], seen


def assert_no_leaks(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks
    proposer = llm.engine.core.proposer
    inner = getattr(proposer, "inner", None)
    if isinstance(inner, DraftModelProposer):
        assert inner.kv.num_free_blocks == inner.kv.num_blocks and inner.kv.num_requests == 0


@pytest.fixture(scope="module")
def reference(tiny_model: Callable[[str], Path]) -> list[list[int]]:
    with LLM(model=str(tiny_model("llama")), **ENGINE) as llm:
        tokens, seen = run(llm)
    assert seen["preemptions"] > 0 and seen["cached"] >= 32, seen
    return tokens


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_equals_plain_decoding(
    tiny_model: Callable[[str], Path], perturbed_draft: Path, reference: list[list[int]], method: str,
    async_scheduling: bool,
) -> None:
    spec = ngram() if method == "ngram" else draft_model(perturbed_draft)
    with LLM(model=str(tiny_model("llama")), speculative_config=spec, async_scheduling=async_scheduling,
             **ENGINE) as llm:
        tokens, seen = run(llm)
        assert tokens == reference
        assert seen["preemptions"] > 0 and seen["cached"] >= 32, seen
        counts = llm.engine.stats().spec_decode
        assert counts is not None
        assert 0 < counts.num_accepted_tokens < counts.num_draft_tokens, counts  # accepted and rejected
        assert_no_leaks(llm)


def test_sharded_target_verifies_drafts(
    tiny_model: Callable[[str], Path], perturbed_draft: Path, reference: list[list[int]]
) -> None:
    """TP=2 x PP=2 (gloo, four rank processes): the drafts travel in the step message, the
    sampling rank verifies them and returns the accepted ones, the other TP ranks get each
    request's last token; the tokens are one rank's plain tokens. The draft model runs unsharded
    in the engine core (the n-gram proposer's drafts reach the ranks the same way)."""
    spec = draft_model(perturbed_draft)
    with LLM(model=str(tiny_model("llama")), speculative_config=spec, tensor_parallel_size=2,
             pipeline_parallel_size=2, **ENGINE) as llm:
        tokens, seen = run(llm)
        assert tokens == reference
        assert seen["preemptions"] > 0 and seen["cached"] >= 32, seen
        counts = llm.engine.stats().spec_decode
        assert counts is not None and 0 < counts.num_accepted_tokens < counts.num_draft_tokens, counts
        assert_no_leaks(llm)


def test_draft_pool_hits_its_own_prefix_cache(tiny_model: Callable[[str], Path]) -> None:
    """The draft model drafting for itself: every draft accepted; the second pass's prompts hit
    the draft's own cached blocks; every draft block is freed as its request ends."""
    model = tiny_model("llama")
    with LLM(model=str(model), speculative_config=draft_model(model, k=4), **ENGINE) as llm:
        tokens, _ = run(llm)
        counts = llm.engine.stats().spec_decode
        assert counts is not None and counts.num_accepted_tokens == counts.num_draft_tokens > 0
        proposer = llm.engine.core.proposer
        inner = getattr(proposer, "inner", None)
        assert isinstance(inner, DraftModelProposer)
        assert inner.kv.stats.hits >= 32
        assert_no_leaks(llm)


@pytest.fixture(scope="module")
def engines(tiny_model: Callable[[str], Path]) -> Iterator[tuple[LLM, LLM]]:
    """(plain, speculative) over the tiny llama with its tokenizer; the draft is the model itself,
    so drafts are accepted unless the target's sampling settings change its choice."""
    model = tiny_model("llama")
    engine: dict[str, Any] = dict(num_kv_blocks=64, max_num_batched_tokens=64, enforce_eager=True)
    with LLM(model=str(model), **engine) as plain, LLM(
        model=str(model), speculative_config=draft_model(model, k=3), **engine
    ) as spec:
        yield plain, spec


def token_ids(outputs: list[Any]) -> list[list[list[int]]]:
    return [[list(c.token_ids) for c in o.outputs] for o in outputs]


def test_sampling_features_match_plain_decoding(engines: tuple[LLM, LLM]) -> None:
    plain, spec = engines
    eos = 2
    params = [
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.4,
                       frequency_penalty=0.6, presence_penalty=0.3),
        SamplingParams(temperature=0.0, max_tokens=16, min_tokens=12, stop_token_ids=[eos]),
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logit_bias={300: 4.0, 301: 3.0}),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
    ]
    prompts = PROMPTS + PROMPTS[:1]
    before = spec.engine.stats().spec_decode
    want, got = plain.generate(prompts, params), spec.generate(prompts, params)
    assert token_ids(got) == token_ids(want)
    after = spec.engine.stats().spec_decode
    assert before is not None and after is not None
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    assert 0 < accepted < after.num_draft_tokens - before.num_draft_tokens  # penalties/bias reject some
    for w, g in zip(want[0].outputs[0].logprobs or [], got[0].outputs[0].logprobs or [], strict=True):
        assert w.keys() == g.keys()
        for token_id in w:
            assert g[token_id].logprob == pytest.approx(w[token_id].logprob, abs=1e-4)
            assert g[token_id].rank == w[token_id].rank
    assert len(got[4].outputs[0].token_ids) == 7


def test_seeded_sampling_is_reproducible_and_n_samples_differ(engines: tuple[LLM, LLM]) -> None:
    """Seeded draws depend on the request's seed and output index only: the same tokens alone
    or in a batch; a step without drafts samples exactly as plain decoding."""
    _, spec = engines
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.95, max_tokens=12, ignore_eos=True, seed=11)
    alone = spec.generate(PROMPTS[1:2], params)
    batched = spec.generate(PROMPTS, [params if i == 1 else SamplingParams(temperature=1.0, max_tokens=9)
                                      for i in range(4)])
    assert token_ids(alone)[0] == token_ids(batched)[1]
    several = spec.generate(PROMPTS[:1], SamplingParams(temperature=1.0, n=3, max_tokens=8, ignore_eos=True))
    samples = token_ids(several)[0]
    assert len(samples) == 3 and len({tuple(s) for s in samples}) > 1 and all(len(s) == 8 for s in samples)


def test_structured_output_keeps_only_drafts_the_grammar_allows(tiny_model: Callable[[str], Path]) -> None:
    """n-gram drafts copy the (periodic) constrained output; the grammar cuts drafts it forbids,
    the rest are verified under the mask: the same text as plain constrained decoding."""
    model = tiny_model("llama")
    engine: dict[str, Any] = dict(num_kv_blocks=64, max_num_batched_tokens=64, enforce_eager=True)
    regex: Any = {"regex": r"[a-c]{3,25}x"}
    params = [SamplingParams(temperature=0.0, max_tokens=30, structured_output=regex),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)]
    prompts = ["Say something:", "Another prompt"]
    with LLM(model=str(model), **engine) as plain:
        want = plain.generate(prompts, params)
    with LLM(model=str(model), speculative_config=ngram(k=4), **engine) as spec:
        got = spec.generate(prompts, params)
        counts = spec.engine.stats().spec_decode
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]
    assert token_ids(got) == token_ids(want)
    text = got[0].outputs[0].text
    assert len(text) >= 4 and set(text[:-1]) <= set("abc") and text.endswith("x")
    assert counts is not None and counts.num_accepted_tokens > 0
