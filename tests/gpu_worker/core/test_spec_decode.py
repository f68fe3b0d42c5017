"""Speculative decoding in the scheduler, with the paged fake runner: the same tokens and finish
reasons as plain decoding (an oracle that generates from the whole sequence) whatever the path
(chunked prefill, preemption, prefix hits, async scheduling), drafts really verified and
partly rejected, every block back in the free list, and the counters of what was accepted."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from gpu_worker.core.request import Request
from gpu_worker.core.scheduler import Scheduler
from gpu_worker.core.types import EngineCoreRequest, FinishReason
from gpu_worker.spec_decode.ngram import NgramProposer
from tests.gpu_worker.core.core_fakes import (
    VOCAB,
    FnProposer,
    PagedFakeRunner,
    assert_no_leak,
    core_request,
    make_scheduler,
    next_token,
    run_to_completion,
    tokens_of,
)
from tests.gpu_worker.core.test_equivalence import workload

BLOCK_SIZE = 4
MAX_MODEL_LEN = 64
K = 4
Model = Callable[[Sequence[int]], int]
Propose = Callable[[Sequence[Request], Sequence[int]], list[list[int]]]


def copy_model(seq: Sequence[int]) -> int:
    """Mostly repeats the token 7 back (n-gram lookup finds it), sometimes not."""
    guess = next_token(seq)
    return seq[-7] if len(seq) >= 7 and guess % 4 else guess


def oracle(req: EngineCoreRequest, model: Model) -> tuple[list[int], FinishReason]:
    """Plain decoding from the whole sequence: no paging, batching, caching or drafts."""
    seq, out = list(req.prompt_token_ids), []
    p = req.params
    stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(req.eos_token_ids))
    while True:
        tok = model(seq)
        seq.append(tok)
        out.append(tok)
        if len(out) >= p.min_tokens and tok in stops:
            return out, FinishReason.STOP
        if len(out) == p.max_tokens or len(seq) == MAX_MODEL_LEN:
            return out, FinishReason.LENGTH


def noisy_oracle_proposer(model: Model) -> Propose:
    """The model's own continuation, with every few drafts wrong: acceptance of any length."""

    def propose(requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        out = []
        for request, limit in zip(requests, max_drafts, strict=True):
            seq, drafts = list(request.all_token_ids), []
            for j in range(min(K, limit)):
                tok = model(seq)
                if (len(request.all_token_ids) * 7 + 3 * j) % 5 == 0:
                    tok = (tok + 1) % VOCAB
                drafts.append(tok)
                seq.append(tok)
            out.append(drafts)
        return out

    return propose


def ngram_proposer(_: Model) -> Propose:
    return NgramProposer(K, 2, 4).propose


PROPOSERS = {"noisy_oracle": (noisy_oracle_proposer, next_token), "ngram": (ngram_proposer, copy_model)}
CONFIGS: dict[str, dict[str, Any]] = {
    "cold_whole": {"num_blocks": 512, "max_num_batched_tokens": 512, "enable_caching": False},
    "chunked": {"num_blocks": 512, "max_num_batched_tokens": 5},
    "tiny_pool": {"num_blocks": 16, "max_num_batched_tokens": 64},
    "tiny_pool_chunked": {"num_blocks": 16, "max_num_batched_tokens": 9, "max_num_seqs": 8},
}


def run(
    sched: Scheduler, runner: PagedFakeRunner, requests: list[EngineCoreRequest], suffix: str = "",
    async_scheduling: bool = False,
) -> dict:
    for r in requests:
        sched.add_request(dataclasses.replace(r, request_id=r.request_id + suffix))
    outputs = run_to_completion(sched, runner, async_scheduling=async_scheduling)
    assert_no_leak(sched.kv)
    return outputs


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("path", list(CONFIGS))
@pytest.mark.parametrize("proposer", list(PROPOSERS))
def test_same_tokens_as_plain_decoding(proposer: str, path: str, async_scheduling: bool) -> None:
    make_proposer, model = PROPOSERS[proposer]
    requests = workload()
    drafts = FnProposer(make_proposer(model))
    sched = make_scheduler(
        block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN, proposer=drafts, **CONFIGS[path]
    )
    runner = PagedFakeRunner(sched.kv.num_blocks, BLOCK_SIZE, model=model)
    outputs = run(sched, runner, requests, async_scheduling=async_scheduling)
    assert tokens_of(outputs) == {r.request_id: oracle(r, model)[0] for r in requests}
    assert {rid: outs[-1].finish_reason for rid, outs in outputs.items()} == {
        r.request_id: oracle(r, model)[1] for r in requests
    }
    stats = sched.stats()
    spec = stats.spec_decode
    assert spec is not None
    verified = sum(e.num_draft_tokens for step in runner.steps for e in step.requests)
    assert spec.num_draft_tokens == verified > 0
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens  # some accepted, some rejected
    assert spec.num_accepted_tokens == sum(spec.num_accepted_tokens_per_pos)
    assert list(spec.num_accepted_tokens_per_pos) == sorted(spec.num_accepted_tokens_per_pos, reverse=True)
    assert spec.num_drafts >= spec.num_accepted_tokens_per_pos[0]
    assert max(e.num_draft_tokens for step in runner.steps for e in step.requests) <= K
    # Drafts ride only on decodes: one real token, then the drafts.
    assert all(
        len(e.token_ids) == 1 + e.num_draft_tokens for step in runner.steps for e in step.requests
        if e.num_draft_tokens
    )
    assert sorted(drafts.dropped) == sorted(r.request_id for r in requests)  # told as each one ended
    if path.startswith("tiny_pool"):
        assert stats.num_preemptions > 0
    if path == "chunked":  # the 5-token budget cut some drafts (1 + 4 tokens per decode)
        assert any(step.num_scheduled_tokens == 5 and len(step.requests) > 1 for step in runner.steps)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_prefix_hits_never_see_rejected_drafts(async_scheduling: bool) -> None:
    """A second pass hits the first pass's cached blocks, written around rejected drafts: the
    fake runner reads every position back from its slots, so a block cached with a rejected
    draft's K/V would change the tokens."""
    requests = workload()
    sched = make_scheduler(
        num_blocks=512, block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN,
        propose=noisy_oracle_proposer(next_token),
    )
    runner = PagedFakeRunner(512, BLOCK_SIZE)
    first = run(sched, runner, requests, async_scheduling=async_scheduling)
    hits = sched.stats().prefix_cache_hits
    second = run(sched, runner, requests, suffix="-again", async_scheduling=async_scheduling)
    assert sched.stats().prefix_cache_hits > hits
    assert tokens_of(first) == {r.request_id: oracle(r, next_token)[0] for r in requests}
    assert tokens_of(second) == {r.request_id + "-again": oracle(r, next_token)[0] for r in requests}
    spec = sched.stats().spec_decode
    assert spec is not None and spec.num_accepted_tokens < spec.num_draft_tokens


def test_drafts_never_run_past_max_tokens_or_max_model_len() -> None:
    """The proposer is asked for at most what the request can still emit (bonus token included)."""
    asked: list[tuple[int, int, int]] = []

    def propose(requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        for request, limit in zip(requests, max_drafts, strict=True):
            asked.append((request.num_output_tokens, request.num_tokens, limit))
        return noisy_oracle_proposer(next_token)(requests, [1000] * len(requests))  # too many: cut

    sched = make_scheduler(block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN, propose=propose)
    runner = PagedFakeRunner(sched.kv.num_blocks, BLOCK_SIZE)
    short = core_request("short", [5, 6, 7], max_tokens=6, ignore_eos=True)
    long = core_request("long", list(range(10, 60)), max_tokens=None, ignore_eos=True)
    outputs = run(sched, runner, [short, long])
    assert len(tokens_of(outputs)["short"]) == 6
    assert len(long.prompt_token_ids) + len(tokens_of(outputs)["long"]) == MAX_MODEL_LEN
    assert tokens_of(outputs) == {"short": oracle(short, next_token)[0], "long": oracle(long, next_token)[0]}
    for num_output, num_tokens, limit in asked:
        assert limit == min(MAX_MODEL_LEN - num_tokens - 1, 6 - num_output - 1 if num_tokens < 20 else 10**9)
    for step in runner.steps:
        for e in step.requests:
            assert e.start_pos + len(e.token_ids) <= MAX_MODEL_LEN - 1


def test_stop_inside_an_accepted_run_cuts_the_output() -> None:
    """All drafts right: a stop token among them ends the output there (nothing after it)."""
    prompt = [3, 1, 4, 1, 5]
    plain = oracle(core_request("p", prompt, max_tokens=12, ignore_eos=True), next_token)[0]
    stop = plain[5]
    req = core_request("r", prompt, max_tokens=12, stop_token_ids=[stop])
    expected, reason = oracle(req, next_token)
    assert reason is FinishReason.STOP and expected[-1] == stop

    def exact(requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        out = []
        for request, limit in zip(requests, max_drafts, strict=True):
            seq = list(request.all_token_ids)
            for _ in range(min(K, limit)):
                seq.append(next_token(seq))
            out.append(seq[request.num_tokens :])
        return out

    sched = make_scheduler(block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN, propose=exact)
    runner = PagedFakeRunner(sched.kv.num_blocks, BLOCK_SIZE)
    outputs = run(sched, runner, [req])
    assert tokens_of(outputs)["r"] == expected
    assert outputs["r"][-1].finish_reason is FinishReason.STOP
    assert len(outputs["r"][-1].new_token_ids) > 1  # the stop arrived inside a multi-token step
    spec = sched.stats().spec_decode
    assert spec is not None and spec.num_accepted_tokens == spec.num_draft_tokens


def test_without_a_proposer_there_are_no_spec_stats() -> None:
    sched = make_scheduler(block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN)
    assert sched.stats().spec_decode is None
