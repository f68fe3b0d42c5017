"""The scheduler's fast paths (the running requests planned and their records and columns built
in one pass, decode records built without the dataclass ``__init__``, ``update`` reading the
plan's columns with one sampled token appended inline) give exactly what the general path gives.

Two schedulers, one with the fast paths off, run the same workload in lockstep, each with its
own paged fake runner: every ``SchedulerOutput``, every list of ``EngineCoreOutput`` (records
compared by their ``vars()`` too, in field order), the state of every live request and the KV
cache's state and events must be equal after every step. The workloads mix prompts with a
shared prefix (prefix hits), chunked prefill, decode, preemption (a small pool), requests that
finish by EOS, stop token, max_tokens and max_model_len, an abort mid-way, logprobs, and
speculative decoding drafts; synchronously and with one step in flight. The fast loops'
inlined opening tests of ``allocate``, ``commit_computed`` and ``_check_stop`` must both skip
calls and let calls through (block boundaries, full blocks, stops and lengths).
"""

from __future__ import annotations

import dataclasses
import pickle
import random
from collections.abc import Callable, Sequence
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


def kv_state(kv: KVCacheManager) -> dict[str, Any]:
    """The KV cache's state: block tables, committed counts, every block, the free list order."""
    return {
        "tables": {rid: [b.block_id for b in table] for rid, table in kv.tables.items()},
        "committed": dict(kv.num_committed),
        "blocks": [(b.block_id, b.ref_cnt, b.block_hash) for b in kv.pool.blocks],
        "free": kv.pool.free_block_ids(),
        "cached": kv.cached_block_hashes(),
    }


def record_fields(records: Sequence[object]) -> list[tuple[type, list[tuple[str, Any]]]]:
    """Each record's type and ``vars()`` in order: the fast paths' inlined record building must
    give the constructor's ``__dict__`` (equality alone reads missing fields off the class)."""
    return [(type(r), list(vars(r).items())) for r in records]


def count_calls(sched: Scheduler) -> dict[str, list[tuple[Any, bool]]]:
    """Wrap ``sched.kv.allocate``, ``sched.kv.commit_computed`` and ``sched._check_stop`` (on the
    instances); per method, each call appends its result and whether its request held a block
    table before the call."""
    calls: dict[str, list[tuple[Any, bool]]] = {}
    for obj, name in ((sched.kv, "allocate"), (sched.kv, "commit_computed"), (sched, "_check_stop")):
        method: Callable[..., Any] = getattr(obj, name)
        results = calls[name] = []

        def counted(*args: Any, method: Callable[..., Any] = method, results: list[Any] = results) -> Any:
            had_table = args[0].request_id in sched.kv.tables
            result = method(*args)
            results.append((result, had_table))
            return result

        setattr(obj, name, counted)
    return calls


def lockstep(
    pair: Sequence[Scheduler], runners: Sequence[PagedFakeRunner], async_scheduling: bool,
    in_flight: list[tuple[SchedulerOutput, RunnerOutput] | None], device_s: float,
) -> list[EngineCoreOutput]:
    """One step of both schedulers (with one step in flight: ``in_flight`` holds each one's),
    checked equal: plan, records, outputs, requests' states, the KV cache and its events.
    Returns the step's outputs."""
    results: list[list[EngineCoreOutput]] = []
    for k, (sched, runner) in enumerate(zip(pair, runners, strict=True)):
        launched = None
        if sched.has_unfinished():
            out = sched.schedule()
            launched = (out, runner.execute(out))
        done = in_flight[k] if async_scheduling else launched
        in_flight[k] = launched if async_scheduling else None
        results.append(sched.update(*done, device_s) if done is not None else [])
    assert runners[0].steps[-1] == runners[1].steps[-1]  # the same SchedulerOutput
    assert record_fields(runners[0].steps[-1].requests) == record_fields(runners[1].steps[-1].requests)
    assert results[0] == results[1]
    assert record_fields(results[0]) == record_fields(results[1])
    assert request_state(pair[0]) == request_state(pair[1])
    assert kv_state(pair[0].kv) == kv_state(pair[1].kv)
    assert pair[0].take_kv_events() == pair[1].take_kv_events()
    return results[0]


def make(cls: type[Scheduler], cfg: dict[str, int], spec: bool) -> Scheduler:
    kv = KVCacheManager(cfg["num_blocks"], BLOCK_SIZE, bool(cfg.get("caching", 1)))
    return cls(
        kv, cfg.get("max_num_seqs", 8), cfg["max_num_batched_tokens"], MAX_MODEL_LEN, BLOCK_SIZE, "seed",
        proposer=FnProposer(propose_copies) if spec else None,
    )


CONFIGS = {
    "ample": {"num_blocks": 256, "max_num_batched_tokens": 64},
    "chunked": {"num_blocks": 256, "max_num_batched_tokens": 7},
    "preempting": {"num_blocks": 14, "max_num_batched_tokens": 64},
    "preempting_chunked": {"num_blocks": 14, "max_num_batched_tokens": 9, "max_num_seqs": 6},
    "uncached": {"num_blocks": 256, "max_num_batched_tokens": 7, "caching": 0},  # no prefix caching
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
    fast, general = count_calls(pair[0]), count_calls(pair[1])
    in_flight: list[tuple[SchedulerOutput, RunnerOutput] | None] = [None, None]
    reasons: set[FinishReason] = set()
    num_preempted = num_drafts = 0
    hashed = False  # whether a live request held block hashes after some step
    for step in range(2000):
        if not pair[0].has_unfinished() and in_flight[0] is None:
            break
        if step == 6:  # an abort mid-way, between two steps
            assert pair[0].abort(["r3", "r8"]) == pair[1].abort(["r3", "r8"])
        outputs = lockstep(pair, runners, async_scheduling, in_flight, 0.001 * (step % 5))
        # The fast path's columns are those of its records (the general path builds none).
        fast_out = runners[0].steps[-1]
        assert fast_out.columns == (None if spec else StepColumns.of(fast_out.requests))
        assert runners[1].steps[-1].columns is None
        hashed |= any(r.block_hashes for sched in pair for r in sched._requests.values())
        num_preempted += len(fast_out.preempted_req_ids)
        num_drafts += sum(e.num_draft_tokens for e in fast_out.requests)
        reasons.update(o.finish_reason for o in outputs if o.finish_reason is not None)
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
    cached = bool(cfg.get("caching", 1))
    assert (pair[0].kv.stats.hits > 0) == cached
    # Without prefix caching no request hashes its blocks (nothing reads them).
    assert hashed == cached
    # Without drafts, the fast loops' inlined tests skip most calls but let through those that
    # change something: blocks appended at a block boundary, blocks that became full (only
    # with prefix caching: without it nothing is committed), stops.
    if not spec:
        for name in ("allocate", "commit_computed", "_check_stop"):
            if name == "commit_computed" and not cached:
                assert not fast[name] and general[name], name
                continue
            assert 0 < len(fast[name]) < len(general[name]), name
        # allocate: blocks appended to a running request's table (at a block boundary), and
        # for a running request only when it appends blocks or finds too few free.
        assert any(ids and had_table for ids, had_table in fast["allocate"])
        assert all(ids is None or ids for ids, had_table in fast["allocate"] if had_table)
        assert {reason for reason, _ in fast["_check_stop"]} >= {FinishReason.STOP, FinishReason.LENGTH}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_stop_ids_before_min_tokens_and_at_the_length_limits_end_alike(async_scheduling: bool) -> None:
    """Tokens that can end a request but do not (a stop id before ``min_tokens``, an ignored
    EOS) and those that do (a stop id, ``max_tokens``, ``max_model_len``), on both paths."""
    requests = [
        core_request("s0", [5, 6, 7], eos=[0], min_tokens=3, max_tokens=9),  # EOS at output 3
        core_request("s1", [5, 6], eos=[0], ignore_eos=True, max_tokens=6),  # EOS ignored: length
        core_request("s2", [8] * 9, stop_token_ids=[1], min_tokens=2),  # stop id at output 2
        core_request("s3", [9] * 30, eos=[0]),  # EOS before min_tokens (0): stops at once
        core_request("s4", [4] * 40),  # runs to max_model_len
    ]
    script = {"s0": [0] * 9, "s1": [0] * 6, "s2": [1] * 4, "s3": [0], "s4": [3] * 8}
    cfg = {"num_blocks": 64, "max_num_batched_tokens": 16}
    pair = [make(Scheduler, cfg, False), make(GeneralScheduler, cfg, False)]
    runners = [PagedFakeRunner(cfg["num_blocks"], BLOCK_SIZE, {k: list(v) for k, v in script.items()})
               for _ in pair]
    fast = count_calls(pair[0])
    for sched in pair:
        for r in requests:
            sched.add_request(r)
    in_flight: list[tuple[SchedulerOutput, RunnerOutput] | None] = [None, None]
    ends: dict[str, tuple[int, FinishReason]] = {}
    num_outputs: dict[str, int] = {}
    while pair[0].has_unfinished() or in_flight[0] is not None:
        for o in lockstep(pair, runners, async_scheduling, in_flight, 0.0):
            num_outputs[o.request_id] = num_outputs.get(o.request_id, 0) + len(o.new_token_ids)
            if o.finish_reason is not None:
                ends[o.request_id] = (num_outputs[o.request_id], o.finish_reason)
    assert ends == {
        "s0": (3, FinishReason.STOP), "s1": (6, FinishReason.LENGTH), "s2": (2, FinishReason.STOP),
        "s3": (1, FinishReason.STOP), "s4": (MAX_MODEL_LEN - 40, FinishReason.LENGTH),
    }
    assert None in {reason for reason, _ in fast["_check_stop"]}  # s0's and s2's early stop ids
    for sched in pair:
        assert_no_leak(sched.kv)


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
    # The template the scheduler's decode loop copies per record: every field, in order, with
    # its default, a new dict per call.
    template = ScheduledRequest.field_defaults()
    assert list(template) == [f.name for f in dataclasses.fields(ScheduledRequest)]
    assert template == vars(ScheduledRequest.for_known(None, None, None, None, None))  # type: ignore[arg-type]
    template["is_new"] = True
    assert ScheduledRequest.field_defaults()["is_new"] is False


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
