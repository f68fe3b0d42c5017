"""The scheduler's fast paths (the running requests planned and their records and columns built
in one pass, decode records built without the dataclass ``__init__``, ``update`` reading the
plan's columns with one sampled token appended inline) give exactly what the general path gives.

Two schedulers, one with the fast paths off, run the same workload in lockstep, each with its
own paged fake runner: every ``SchedulerOutput``, every list of ``EngineCoreOutput`` and the
state of every live request must be equal after every step. The workloads mix prompts with a
shared prefix (prefix hits), chunked prefill, decode, preemption (a small pool), requests that
finish by EOS, stop token, max_tokens and max_model_len, an abort mid-way, logprobs, and
speculative decoding drafts; synchronously and with one step in flight.
"""

from __future__ import annotations

import dataclasses
import pickle
import random
from collections.abc import Sequence
from typing import Any

import pytest

from gpu_worker.core.kv_cache_manager import KVCacheManager
from gpu_worker.core.request import Request
from gpu_worker.core.scheduler import Scheduler
from gpu_worker.core.types import (
    EngineCoreOutput,
    EngineCoreRequest,
    FinishReason,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    StepColumns,
    TokenLogprobs,
)
from tests.gpu_worker.core.core_fakes import (
    FnProposer,
    PagedFakeRunner,
    assert_no_leak,
    core_request,
    next_token,
)

BLOCK_SIZE = 4
MAX_MODEL_LEN = 48


class GeneralScheduler(Scheduler):
    """The scheduler with its fast paths off."""

    _FAST_PATHS = False


class LogprobRunner(PagedFakeRunner):
    """The paged fake runner, plus a logprob for every other sampled request (by id parity),
    so outputs with and without logprobs both go through ``update``."""

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        result = super().execute(out)
        lps = tuple(
            TokenLogprobs(tok, -0.5, 1) if int(rid[1:]) % 2 else None
            for rid, tok in zip(result.req_ids, result.sampled_token_ids, strict=True)
        )
        return dataclasses.replace(result, logprobs=lps)


def workload(seed: int) -> list[EngineCoreRequest]:
    """24 requests: half share a 9-token prefix; EOS / stop ids / max_tokens / context ends."""
    rng = random.Random(seed)
    shared = [rng.randrange(1, 97) for _ in range(9)]
    out = []
    for i in range(24):
        tail = [rng.randrange(1, 97) for _ in range(rng.randint(1, 25))]
        prompt = shared + tail if i % 2 == 0 else tail
        max_tokens = rng.choice([1, 5, 12, None])  # None: runs to max_model_len unless stopped
        min_tokens = min(max_tokens or 2, rng.choice([0, 0, 2]))
        params: dict[str, Any] = {"max_tokens": max_tokens, "min_tokens": min_tokens}
        if i % 3 == 0:
            params["stop_token_ids"] = [rng.randrange(97)]
        out.append(core_request(f"r{i}", prompt, eos=[0, 1, 2], ignore_eos=(i % 4 == 1), **params))
    return out


def propose_copies(requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
    """Drafts that are sometimes right: the model's next token, then repeats of the last one."""
    out = []
    for request, k in zip(requests, max_drafts, strict=True):
        seq = list(request.all_token_ids)
        first = next_token(seq)
        out.append(([first] + [seq[-1]] * 2)[: min(k, 3)])
    return out


def request_state(sched: Scheduler) -> dict[str, dict[str, Any]]:
    """Every attribute of every live request, and its block table."""
    out = {}
    for rid in sorted(sched._requests):
        request = sched._requests[rid]
        state = dict(vars(request))
        state["status"] = request.status.name
        state["blocks"] = sched.kv.block_ids(request)
        out[rid] = state
    return out


def make(cls: type[Scheduler], cfg: dict[str, int], spec: bool) -> Scheduler:
    kv = KVCacheManager(cfg["num_blocks"], BLOCK_SIZE, True)
    return cls(
        kv, cfg.get("max_num_seqs", 8), cfg["max_num_batched_tokens"], MAX_MODEL_LEN, BLOCK_SIZE, "seed",
        proposer=FnProposer(propose_copies) if spec else None,
    )


CONFIGS = {
    "ample": {"num_blocks": 256, "max_num_batched_tokens": 64},
    "chunked": {"num_blocks": 256, "max_num_batched_tokens": 7},
    "preempting": {"num_blocks": 14, "max_num_batched_tokens": 64},
    "preempting_chunked": {"num_blocks": 14, "max_num_batched_tokens": 9, "max_num_seqs": 6},
}


@pytest.mark.parametrize("spec", [False, True], ids=["plain", "spec"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fast_paths_match_the_general_path(config: str, async_scheduling: bool, spec: bool) -> None:
    cfg = CONFIGS[config]
    pair = [make(Scheduler, cfg, spec), make(GeneralScheduler, cfg, spec)]
    runners = [LogprobRunner(cfg["num_blocks"], BLOCK_SIZE) for _ in pair]
    for sched in pair:
        for r in workload(seed=len(config)):
            sched.add_request(r)
    in_flight: list[tuple[SchedulerOutput, RunnerOutput] | None] = [None, None]
    reasons: set[FinishReason] = set()
    num_preempted = num_drafts = 0
    for step in range(2000):
        if not pair[0].has_unfinished() and in_flight[0] is None:
            break
        if step == 6:  # an abort mid-way, between two steps
            assert pair[0].abort(["r3", "r8"]) == pair[1].abort(["r3", "r8"])
        results: list[list[EngineCoreOutput]] = []
        for k, (sched, runner) in enumerate(zip(pair, runners, strict=True)):
            launched = None
            if sched.has_unfinished():
                out = sched.schedule()
                launched = (out, runner.execute(out))
            done = in_flight[k] if async_scheduling else launched
            in_flight[k] = launched if async_scheduling else None
            results.append(sched.update(*done, 0.001 * (step % 5)) if done is not None else [])
        assert runners[0].steps[-1] == runners[1].steps[-1]  # the same SchedulerOutput
        # The fast path's columns are those of its records (the general path builds none).
        fast_out = runners[0].steps[-1]
        assert fast_out.columns == (None if spec else StepColumns.of(fast_out.requests))
        assert runners[1].steps[-1].columns is None
        assert results[0] == results[1]
        assert request_state(pair[0]) == request_state(pair[1])
        num_preempted += len(runners[0].steps[-1].preempted_req_ids)
        num_drafts += sum(e.num_draft_tokens for e in runners[0].steps[-1].requests)
        reasons.update(o.finish_reason for o in results[0] if o.finish_reason is not None)
    else:
        raise AssertionError("did not finish")
    assert len(runners[0].steps) == len(runners[1].steps)
    for sched in pair:
        assert_no_leak(sched.kv)
    assert pair[0].stats() == pair[1].stats()
    # The workload did go through the paths it is meant to cover.
    assert reasons == {FinishReason.STOP, FinishReason.LENGTH}
    assert (num_preempted > 0) == config.startswith("preempting")
    assert (num_drafts > 0) == spec
    assert pair[0].kv.stats.hits > 0


def test_fast_records_equal_constructed_ones() -> None:
    """``ScheduledRequest.for_known`` and ``EngineCoreOutput.fast`` build records equal to the
    constructor's: same fields (every field present), equality, hash, repr, still frozen."""
    for fast, slow in [
        (ScheduledRequest.for_known("r", (1, -1), 7, (3,), True),
         ScheduledRequest("r", (1, -1), 7, (3,), True)),
        (ScheduledRequest.for_known("r", (1, 2, 3), 7, (), True, 2),
         ScheduledRequest("r", (1, 2, 3), 7, (), True, num_draft_tokens=2)),
        (EngineCoreOutput.fast("r", (5,), (TokenLogprobs(5, -0.1, 1),), FinishReason.STOP, 4, 5, 0.25),
         EngineCoreOutput("r", (5,), new_logprobs=(TokenLogprobs(5, -0.1, 1),),
                          finish_reason=FinishReason.STOP, num_cached_tokens=4, stop_token_id=5,
                          device_s=0.25)),
    ]:
        assert type(fast) is type(slow)
        assert vars(fast) == vars(slow)
        assert list(vars(fast)) == [f.name for f in dataclasses.fields(slow)]
        assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
        assert pickle.loads(pickle.dumps(fast)) == slow
        with pytest.raises(dataclasses.FrozenInstanceError):
            fast.sample = False  # type: ignore[misc,union-attr]


class ReversedRunner(LogprobRunner):
    """The same samples, reported in reverse order: ``update``'s column walk takes samples in
    plan order only, so such an output goes the general way."""

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        result = super().execute(out)
        return dataclasses.replace(
            result, req_ids=result.req_ids[::-1], sampled_token_ids=result.sampled_token_ids[::-1],
            logprobs=result.logprobs[::-1],
        )


def test_a_runner_output_in_another_order_is_accounted_alike() -> None:
    """Steps with two or more samples in reverse order take the general path (the column walk
    runs for the others only) and give the same outputs and states."""
    cfg = CONFIGS["preempting"]
    pair = [make(Scheduler, cfg, False), make(Scheduler, cfg, False)]
    runners = [LogprobRunner(cfg["num_blocks"], BLOCK_SIZE), ReversedRunner(cfg["num_blocks"], BLOCK_SIZE)]
    column_walks: list[int] = []
    walk = pair[1]._update_columns

    def counted(*args: Any) -> list[EngineCoreOutput]:
        column_walks.append(1)
        return walk(*args)

    pair[1]._update_columns = counted  # type: ignore[method-assign]
    for sched in pair:
        for r in workload(seed=3):
            sched.add_request(r)
    reordered = 0
    while pair[0].has_unfinished():
        results = []
        for sched, runner in zip(pair, runners, strict=True):
            out = sched.schedule()
            results.append(sched.update(out, runner.execute(out), 0.001))
        reordered += sum(e.sample for e in runners[1].steps[-1].requests) > 1
        assert results[0] == results[1]
        assert request_state(pair[0]) == request_state(pair[1])
    assert not pair[1].has_unfinished() and reordered > 0
    assert len(column_walks) == len(runners[1].steps) - reordered
    assert pair[0].stats() == pair[1].stats()
