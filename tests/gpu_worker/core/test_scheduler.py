"""Scheduler: validation, budgets and chunking, admission order, preemption, abort, stops."""

from __future__ import annotations

from typing import Any

import pytest

from gpu_worker.core.request import RequestStatus
from gpu_worker.core.scheduler import Scheduler
from gpu_worker.core.scheduling_policy import PriorityPolicy
from gpu_worker.core.types import (
    EngineCoreOutput,
    FinishReason,
    RunnerOutput,
    ScheduledRequest,
    SchedulerStats,
    TokenLogprobs,
)
from tests.gpu_worker.core.core_fakes import (
    PagedFakeRunner,
    assert_no_leak,
    core_request,
    make_scheduler,
    run_to_completion,
)


def step(sched: Scheduler, runner: PagedFakeRunner) -> tuple[list[ScheduledRequest], list[EngineCoreOutput]]:
    out = sched.schedule()
    return list(out.requests), sched.update(out, runner.execute(out))


def summary(entries: list[ScheduledRequest]) -> list[tuple[str, int, int, tuple[int, ...], bool, bool]]:
    """(id, start, n tokens, block ids, sample, is_new) per scheduled request."""
    return [(e.req_id, e.start_pos, len(e.token_ids), e.block_ids, e.sample, e.is_new) for e in entries]


def test_add_request_rejects_invalid_input() -> None:
    # (Empty prompts never get here: llmserve.prompt_input.check_prompt_input refuses them.)
    sched = make_scheduler(max_model_len=8)
    with pytest.raises(ValueError, match="8 tokens; it must be shorter than max_model_len"):
        sched.add_request(core_request("a", range(8)))
    sched.add_request(core_request("a", range(7)))
    with pytest.raises(ValueError, match="request_id 'a' is already in use"):
        sched.add_request(core_request("a", range(3)))
    assert sched.stats().num_waiting == 1


def test_constructor_requires_a_pool_that_fits_one_request() -> None:
    with pytest.raises(ValueError, match="exceeds the KV pool capacity 16"):
        make_scheduler(num_blocks=4, block_size=4, max_model_len=17)


def test_long_prompt_is_chunked_under_the_token_budget() -> None:
    sched = make_scheduler(block_size=4, max_num_batched_tokens=8)
    runner = PagedFakeRunner(64, 4)
    sched.add_request(core_request("a", range(20), max_tokens=3))
    out = sched.schedule()
    first = out.requests[0]
    assert (first.is_new, first.prompt_len, first.output_token_ids, first.token_ids) == (
        True,
        20,
        (),
        tuple(range(8)),
    )
    assert first.params is not None and first.params.max_tokens == 3
    assert out.num_scheduled_tokens == 8
    sched.update(out, runner.execute(out))
    got = [step(sched, runner) for _ in range(4)]
    assert [summary(entries) for entries, _ in got] == [
        [("a", 8, 8, (2, 3), False, False)],
        [("a", 16, 4, (4,), True, False)],
        [("a", 20, 1, (5,), True, False)],
        [("a", 21, 1, (), True, False)],
    ]
    outs = [o for _, outs in got for o in outs]
    assert [o.finish_reason for o in outs] == [None, None, FinishReason.LENGTH]
    assert len([t for o in outs for t in o.new_token_ids]) == 3
    last = sched.schedule()
    assert last.is_empty and last.finished_req_ids == frozenset({"a"})
    assert not sched.has_unfinished()
    assert_no_leak(sched.kv)


def test_running_requests_are_served_before_waiting_ones_share_the_budget() -> None:
    sched = make_scheduler(block_size=4, max_num_batched_tokens=8)
    runner = PagedFakeRunner(64, 4)
    sched.add_request(core_request("a", range(6), max_tokens=3))
    sched.add_request(core_request("b", range(10, 16), max_tokens=3))
    assert summary(step(sched, runner)[0]) == [
        ("a", 0, 6, (0, 1), True, True),
        ("b", 0, 2, (2,), False, True),
    ]
    sched.add_request(core_request("c", range(20, 30), max_tokens=1))
    assert summary(step(sched, runner)[0]) == [
        ("a", 6, 1, (), True, False),
        ("b", 2, 4, (3,), True, False),
        ("c", 0, 3, (4,), False, True),
    ]
    assert summary(step(sched, runner)[0]) == [
        ("a", 7, 1, (), True, False),
        ("b", 6, 1, (), True, False),
        ("c", 3, 6, (5, 6), False, False),
    ]
    assert summary(step(sched, runner)[0]) == [("b", 7, 1, (), True, False), ("c", 9, 1, (), True, False)]
    run_to_completion(sched, runner)
    assert_no_leak(sched.kv)


def test_max_num_seqs_bounds_the_running_set() -> None:
    sched = make_scheduler(max_num_seqs=2)
    runner = PagedFakeRunner(64, 4)
    for rid in "abc":
        sched.add_request(core_request(rid, range(4), max_tokens=2))
    assert [e.req_id for e in step(sched, runner)[0]] == ["a", "b"]
    assert (sched.stats().num_running, sched.stats().num_waiting) == (2, 1)
    entries, outs = step(sched, runner)
    assert [e.req_id for e in entries] == ["a", "b"]
    assert [(o.request_id, o.finish_reason) for o in outs] == [
        ("a", FinishReason.LENGTH),
        ("b", FinishReason.LENGTH),
    ]
    out = sched.schedule()
    assert [e.req_id for e in out.requests] == ["c"]
    # "c" hits the blocks "a" computed: its 4-token prompt is one full block, kept uncached.
    assert out.requests[0].start_pos == 0
    assert out.finished_req_ids == frozenset({"a", "b"})
    sched.update(out, runner.execute(out))
    run_to_completion(sched, runner)
    assert_no_leak(sched.kv)


def test_admission_is_by_priority_then_arrival_then_insertion() -> None:
    sched = make_scheduler(max_num_seqs=1, policy=PriorityPolicy())
    runner = PagedFakeRunner(64, 4)
    sched.add_request(core_request("late", [1, 2], arrival=2.0, max_tokens=1))
    sched.add_request(core_request("early", [1, 3], arrival=1.0, max_tokens=1))
    sched.add_request(core_request("tie1", [1, 4], arrival=5.0, max_tokens=1))
    sched.add_request(core_request("urgent", [1, 5], arrival=3.0, priority=-1, max_tokens=1))
    sched.add_request(core_request("tie2", [1, 6], arrival=5.0, max_tokens=1))
    order = [e.req_id for _ in range(5) for e in step(sched, runner)[0]]
    assert order == ["urgent", "early", "late", "tie1", "tie2"]
    assert not sched.has_unfinished()
    assert_no_leak(sched.kv)


def test_preempts_the_most_recently_admitted_and_resumes_it_first() -> None:
    # Pool of 4 blocks of 2 tokens; each request grows to 8 tokens (4 blocks).
    sched = make_scheduler(num_blocks=4, block_size=2, max_model_len=8)
    runner = PagedFakeRunner(4, 2)
    sched.add_request(core_request("a", [1, 2, 3], max_tokens=5))
    sched.add_request(core_request("b", [4, 5, 6], max_tokens=5))
    assert summary(step(sched, runner)[0]) == [
        ("a", 0, 3, (0, 1), True, True),
        ("b", 0, 3, (2, 3), True, True),
    ]
    assert summary(step(sched, runner)[0]) == [("a", 3, 1, (), True, False), ("b", 3, 1, (), True, False)]
    out = sched.schedule()
    # "a" needs a third block: "b" is preempted; its freed tail block 3 goes to "a".
    assert summary(list(out.requests)) == [("a", 4, 1, (3,), True, False)]
    assert out.preempted_req_ids == frozenset({"b"})
    b = sched.get_request("b")
    assert b is not None and (b.status, b.num_computed_tokens) == (RequestStatus.PREEMPTED, 0)
    assert sched.stats().num_preemptions == 1
    assert (sched.stats().num_running, sched.stats().num_waiting) == (1, 1)
    sched.update(out, runner.execute(out))
    b_outputs = list(b.output_token_ids)
    assert len(b_outputs) == 2
    outputs = run_to_completion(sched, runner)
    # "b" resumed with its whole sequence recomputed (its cached block was evicted by "a").
    resumed = [e for s in runner.steps for e in s.requests if e.req_id == "b" and e.is_new][-1]
    assert (resumed.start_pos, resumed.token_ids[:3], resumed.output_token_ids) == (
        0,
        (4, 5, 6),
        tuple(b_outputs),
    )
    assert resumed.token_ids[3:] == tuple(b_outputs)
    assert outputs["a"][-1].finish_reason == FinishReason.LENGTH
    assert outputs["b"][-1].finish_reason == FinishReason.LENGTH
    assert [o.num_cached_tokens for o in outputs["b"]] == [0, 0, 0]
    assert_no_leak(sched.kv)


def two_requests_in_four_blocks() -> tuple[Scheduler, PagedFakeRunner]:
    """A pool of 4 blocks of 2 tokens after one step of "a" (3 prompt tokens, 4 new) and "b"
    (4 prompt tokens, 3 new): the next step needs more blocks than are free."""
    sched = make_scheduler(num_blocks=4, block_size=2, max_model_len=8)
    runner = PagedFakeRunner(4, 2)
    sched.add_request(core_request("a", [1, 2, 3], max_tokens=4))
    sched.add_request(core_request("b", [4, 5, 6, 7], max_tokens=3))
    step(sched, runner)
    return sched, runner


def test_request_being_scheduled_preempts_itself_when_it_is_the_newest() -> None:
    sched, runner = two_requests_in_four_blocks()
    out = sched.schedule()
    # "a" fits in its 2 blocks; "b" needs a third block and is itself the newest.
    assert summary(list(out.requests)) == [("a", 3, 1, (), True, False)]
    assert out.preempted_req_ids == frozenset({"b"})
    sched.update(out, runner.execute(out))
    outputs = run_to_completion(sched, runner)
    # a: 4 tokens in all, 2 produced above; b: 3 in all, 1 produced in the first step.
    assert [len(outputs[r]) for r in ("a", "b")] == [2, 2]
    assert [outputs[r][-1].finish_reason for r in ("a", "b")] == [FinishReason.LENGTH] * 2
    assert sched.stats().num_preemptions == 1
    assert_no_leak(sched.kv)


def test_abort_waiting_running_and_in_flight_requests() -> None:
    sched = make_scheduler(max_num_seqs=2)
    runner = PagedFakeRunner(64, 4)
    for rid in "abc":
        sched.add_request(core_request(rid, range(6), max_tokens=5))
    step(sched, runner)
    assert sched.kv.num_requests == 2
    aborted = sched.abort(["c", "a", "unknown"])  # c waiting, a running
    assert aborted == [
        EngineCoreOutput("c", (), finish_reason=FinishReason.ABORT),
        EngineCoreOutput("a", (), finish_reason=FinishReason.ABORT),
    ]
    assert sched.kv.block_ids(sched.get_request("b")) == [2, 3]  # type: ignore[arg-type]
    out = sched.schedule()
    assert out.finished_req_ids == frozenset({"a", "c"})
    assert [e.req_id for e in out.requests] == ["b"]
    # Aborted between schedule() and update(): the runner's result is ignored.
    assert sched.abort(["b"])[0].finish_reason == FinishReason.ABORT
    assert sched.update(out, runner.execute(out)) == []
    assert sched.abort(["b"]) == []
    assert not sched.has_unfinished()
    assert sched.schedule().finished_req_ids == frozenset({"b"})
    assert_no_leak(sched.kv)


def test_abort_of_a_preempted_request() -> None:
    sched, runner = two_requests_in_four_blocks()
    step(sched, runner)
    assert sched.get_request("b").status is RequestStatus.PREEMPTED  # type: ignore[union-attr]
    assert [o.request_id for o in sched.abort(["b"])] == ["b"]
    assert sched.stats().num_waiting == 0
    run_to_completion(sched, runner)
    assert_no_leak(sched.kv)


@pytest.mark.parametrize(
    ("params", "eos", "script", "tokens", "reason", "stop_id"),
    [
        ({}, [5], [1, 5, 7], [1, 5], FinishReason.STOP, 5),
        ({"ignore_eos": True, "max_tokens": 3}, [5], [5, 5, 5], [5, 5, 5], FinishReason.LENGTH, None),
        ({"min_tokens": 2}, [5], [5, 5, 7], [5, 5], FinishReason.STOP, 5),
        ({"min_tokens": 3}, [5], [5, 5, 8, 5], [5, 5, 8, 5], FinishReason.STOP, 5),
        ({"stop_token_ids": [9]}, [], [1, 9, 2], [1, 9], FinishReason.STOP, 9),
        ({"stop_token_ids": [9], "ignore_eos": True}, [5], [5, 9], [5, 9], FinishReason.STOP, 9),
        ({"stop_token_ids": [9], "max_tokens": 2}, [], [1, 9], [1, 9], FinishReason.STOP, 9),
        ({"max_tokens": 2}, [5], [1, 2, 3], [1, 2], FinishReason.LENGTH, None),
        ({"max_tokens": None}, [], [1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6], FinishReason.LENGTH, None),
    ],
)
def test_stop_conditions(
    params: dict[str, Any],
    eos: list[int],
    script: list[int],
    tokens: list[int],
    reason: FinishReason,
    stop_id: int | None,
) -> None:
    sched = make_scheduler(max_model_len=12)  # prompt 6 + at most 6 tokens
    runner = PagedFakeRunner(64, 4, script={"r": list(script)})
    sched.add_request(core_request("r", [11, 12, 13, 14, 15, 16], eos=eos, **{"max_tokens": 16, **params}))
    outputs = run_to_completion(sched, runner)["r"]
    assert [t for o in outputs for t in o.new_token_ids] == tokens
    assert [o.finish_reason for o in outputs] == [None] * (len(tokens) - 1) + [reason]
    assert outputs[-1].stop_token_id == stop_id
    assert_no_leak(sched.kv)


def test_outputs_carry_cached_tokens_logprobs_and_stats() -> None:
    sched = make_scheduler(block_size=4)
    runner = PagedFakeRunner(64, 4)
    sched.add_request(core_request("a", range(10), max_tokens=1))
    run_to_completion(sched, runner)
    sched.add_request(core_request("b", list(range(8)) + [70, 71, 72], max_tokens=2))
    out = sched.schedule()
    assert summary(list(out.requests)) == [("b", 8, 3, (0, 1, 3), True, True)]
    runner.execute(out)  # keeps the fake runner's block tables; its token is replaced below
    lp = TokenLogprobs(token_id=42, logprob=-0.5, rank=1)
    outs = sched.update(out, RunnerOutput(("b",), (42,), (lp,)))
    assert outs == [EngineCoreOutput("b", (42,), (lp,), None, num_cached_tokens=8)]
    assert sched.stats() == SchedulerStats(
        num_running=1,
        num_waiting=0,
        kv_usage=3 / 64,
        num_free_blocks=61,
        num_total_blocks=64,
        prefix_cache_queries=21,
        prefix_cache_hits=8,
        num_preemptions=0,
    )
    rest = run_to_completion(sched, runner)
    assert [o.num_cached_tokens for o in rest["b"]] == [8]
    sched.add_request(core_request("x", [1]))
    out = sched.schedule()
    with pytest.raises(ValueError, match=r"no sampled token for requests \['x'\]"):
        sched.update(out, RunnerOutput((), ()))
    assert sched.get_request("x").num_computed_tokens == 0  # type: ignore[union-attr]
    sched.abort(["x"])
    assert_no_leak(sched.kv)
