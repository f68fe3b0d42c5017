"""Same tokens whatever the path: prefix hit vs cold, chunked vs whole, preemption vs ample pool,
32 requests together vs one at a time, synchronous or async scheduling (one step in flight).
Every run is checked against a plain-Python oracle that generates from the whole sequence, and
ends with every block back in the free list."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from gpu_worker.core.scheduler import Scheduler
from gpu_worker.core.types import EngineCoreRequest, FinishReason
from tests.gpu_worker.core.core_fakes import (
    PagedFakeRunner,
    assert_no_leak,
    core_request,
    make_scheduler,
    next_token,
    run_to_completion,
    tokens_of,
)

BLOCK_SIZE = 4
MAX_MODEL_LEN = 64


def workload(num: int = 32, seed: int = 0) -> list[EngineCoreRequest]:
    """Prompts of 1..43 tokens, half sharing a 13-token prefix; varied stop settings."""
    rng = random.Random(seed)
    shared = [rng.randrange(1, 97) for _ in range(13)]
    out = []
    for i in range(num):
        tail = [rng.randrange(1, 97) for _ in range(rng.randint(1, 30))]
        prompt = shared + tail if i % 2 == 0 else tail
        max_tokens = rng.randint(1, 12)
        params: dict[str, Any] = {
            "max_tokens": max_tokens,
            "min_tokens": min(max_tokens, rng.choice([0, 0, 3])),
        }
        if i % 3 == 0:
            params["stop_token_ids"] = [rng.randrange(97)]
        out.append(core_request(f"r{i}", prompt, eos=[0, 1, 2], ignore_eos=(i % 4 == 1), **params))
    return out


def oracle(req: EngineCoreRequest) -> tuple[list[int], FinishReason]:
    """Generation without any paging, batching or caching."""
    seq, out = list(req.prompt_token_ids), []
    p = req.params
    stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(req.eos_token_ids))
    while True:
        tok = next_token(seq)
        seq.append(tok)
        out.append(tok)
        if len(out) >= p.min_tokens and tok in stops:
            return out, FinishReason.STOP
        if len(out) == p.max_tokens or len(seq) == MAX_MODEL_LEN:
            return out, FinishReason.LENGTH


def run(
    sched: Scheduler,
    requests: list[EngineCoreRequest],
    together: bool,
    suffix: str = "",
    runner: PagedFakeRunner | None = None,
    async_scheduling: bool = False,
) -> dict:
    """Run ``requests`` to completion; the runner (its paged cache) must live as long as the
    scheduler's prefix cache."""
    runner = runner or PagedFakeRunner(sched.kv.num_blocks, BLOCK_SIZE)
    outputs = {}
    batches = [requests] if together else [[r] for r in requests]
    for batch in batches:
        for r in batch:
            sched.add_request(dataclasses.replace(r, request_id=r.request_id + suffix))
        outputs.update(run_to_completion(sched, runner, async_scheduling=async_scheduling))
    assert_no_leak(sched.kv)
    return outputs


def expected(requests: list[EngineCoreRequest], suffix: str = "") -> dict:
    return {r.request_id + suffix: oracle(r)[0] for r in requests}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("together", [True, False], ids=["together", "one_at_a_time"])
@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"num_blocks": 512, "max_num_batched_tokens": 512, "enable_caching": False}, "cold_whole"),
        ({"num_blocks": 512, "max_num_batched_tokens": 5}, "chunked"),
        ({"num_blocks": 16, "max_num_batched_tokens": 64}, "tiny_pool"),
        ({"num_blocks": 16, "max_num_batched_tokens": 7, "max_num_seqs": 5}, "tiny_pool_chunked"),
    ],
)
def test_same_tokens_whatever_the_path(
    config: dict, path: str, together: bool, async_scheduling: bool
) -> None:
    requests = workload()
    sched = make_scheduler(block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN, **config)
    runner = PagedFakeRunner(sched.kv.num_blocks, BLOCK_SIZE)
    outputs = run(sched, requests, together, runner=runner, async_scheduling=async_scheduling)
    assert (runner.num_placeholders > 0) == async_scheduling  # decodes really ran one step ahead
    assert tokens_of(outputs) == expected(requests)
    reasons = {rid: outs[-1].finish_reason for rid, outs in outputs.items()}
    assert reasons == {r.request_id: oracle(r)[1] for r in requests}
    stats = sched.stats()
    if path.startswith("tiny_pool") and together:
        assert stats.num_preemptions > 0
    if not together:
        assert stats.num_preemptions == 0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_prefix_cache_hits_give_the_same_tokens_as_cold_runs(async_scheduling: bool) -> None:
    requests = workload()
    sched = make_scheduler(num_blocks=512, block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN)
    runner = PagedFakeRunner(512, BLOCK_SIZE)
    first = run(sched, requests, together=False, runner=runner, async_scheduling=async_scheduling)
    hits_after_first = sched.stats().prefix_cache_hits
    assert hits_after_first > 0  # the shared 13-token prefix: 3 full blocks
    second = run(
        sched, requests, together=True, suffix="-again", runner=runner, async_scheduling=async_scheduling
    )
    assert tokens_of(first) == expected(requests)
    assert tokens_of(second) == expected(requests, "-again")
    # Every second-pass prompt hits its own earlier blocks (all but the last token).
    assert all(
        outs[0].num_cached_tokens > 0
        for rid, outs in second.items()
        if len(requests[int(rid[1:].split("-")[0])].prompt_token_ids) > BLOCK_SIZE
    )
    assert sched.stats().prefix_cache_hits > hits_after_first
