"""Scheduling policies in the scheduler: fcfs ignores priority, priority admits and preempts by
rank, a preempted request yields only to a strictly better waiting one, a request whose grammar is
not ready is passed over, and a constrained request never gets a placeholder (async)."""

from __future__ import annotations

from gpu_worker.core.request import Request, RequestStatus
from gpu_worker.core.scheduler import Scheduler
from gpu_worker.core.scheduling_policy import FCFSPolicy, PriorityPolicy
from gpu_worker.core.types import PLACEHOLDER_TOKEN_ID, EngineCoreOutput, ScheduledRequest
from tests.gpu_worker.core.core_fakes import (
    PagedFakeRunner,
    assert_no_leak,
    core_request,
    make_scheduler,
    run_to_completion,
    tokens_of,
)


def step(sched: Scheduler, runner: PagedFakeRunner) -> tuple[list[ScheduledRequest], list[EngineCoreOutput]]:
    out = sched.schedule()
    return list(out.requests), sched.update(out, runner.execute(out))


def admission_order(sched: Scheduler, runner: PagedFakeRunner, steps: int) -> list[str]:
    return [e.req_id for _ in range(steps) for e in step(sched, runner)[0] if e.is_new]


def test_fcfs_ignores_priority() -> None:
    sched = make_scheduler(max_num_seqs=1, policy=FCFSPolicy())
    runner = PagedFakeRunner(64, 4)
    sched.add_request(core_request("first", [1, 2], arrival=1.0, priority=5, max_tokens=1))
    sched.add_request(core_request("urgent", [1, 3], arrival=2.0, priority=-5, max_tokens=1))
    assert admission_order(sched, runner, 2) == ["first", "urgent"]


def test_priority_request_into_a_saturated_engine_is_admitted_before_queued_ones() -> None:
    sched = make_scheduler(max_num_seqs=2, policy=PriorityPolicy())
    runner = PagedFakeRunner(64, 4)
    for i, rid in enumerate(["run1", "run2", "low1", "low2"]):
        sched.add_request(core_request(rid, [1, i + 2], arrival=float(i), priority=1, max_tokens=3))
    assert admission_order(sched, runner, 1) == ["run1", "run2"]  # saturated: low1, low2 queued
    sched.add_request(core_request("high", [1, 9], arrival=9.0, priority=0, max_tokens=3))
    order = admission_order(sched, runner, 12)
    assert order == ["high", "low1", "low2"]
    assert not sched.has_unfinished()
    assert_no_leak(sched.kv)


def test_preemption_picks_the_lowest_priority_then_the_most_recently_admitted() -> None:
    # 6 blocks of 2 tokens; three requests of 3 prompt tokens grow to 3 blocks each: not all fit.
    sched = make_scheduler(num_blocks=6, block_size=2, max_model_len=12, policy=PriorityPolicy())
    runner = PagedFakeRunner(6, 2)
    sched.add_request(core_request("low", [1, 2, 3], arrival=0.0, priority=5, max_tokens=6))
    sched.add_request(core_request("high", [4, 5, 6], arrival=1.0, priority=0, max_tokens=6))
    sched.add_request(core_request("mid", [7, 8, 9], arrival=2.0, priority=2, max_tokens=6))
    entries, _ = step(sched, runner)
    assert [e.req_id for e in entries] == ["high", "mid", "low"]  # admitted by priority
    preempted = []
    while sched.has_unfinished():
        out = sched.schedule()
        preempted.extend(sorted(out.preempted_req_ids))
        sched.update(out, runner.execute(out))
    assert preempted[0] == "low"  # the lowest priority goes first, although it was admitted first
    assert "high" not in preempted
    assert_no_leak(sched.kv)


def test_preempted_request_resumes_first_unless_a_waiting_one_ranks_strictly_better() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2, max_model_len=8, max_num_seqs=2,
                           policy=PriorityPolicy())
    runner = PagedFakeRunner(4, 2)
    sched.add_request(core_request("a", [1, 2, 3], priority=1, max_tokens=5))
    sched.add_request(core_request("b", [4, 5, 6], priority=1, max_tokens=5))
    step(sched, runner)
    step(sched, runner)
    out = sched.schedule()  # "a" needs a block: "b" (same rank, admitted later) is preempted
    assert out.preempted_req_ids == frozenset({"b"})
    sched.update(out, runner.execute(out))
    sched.add_request(core_request("equal", [7, 8], arrival=5.0, priority=1, max_tokens=1))
    sched.add_request(core_request("better", [7, 9], arrival=6.0, priority=0, max_tokens=1))
    outputs = run_to_completion(sched, runner)
    resumed = [e.req_id for s in runner.steps[3:] for e in s.requests if e.is_new]
    assert resumed == ["better", "b", "equal"]
    assert set(outputs) == {"a", "b", "equal", "better"}
    assert_no_leak(sched.kv)


def test_a_request_that_is_not_ready_waits_without_holding_up_others() -> None:
    blocked = {"compiling"}

    def ready(request: Request) -> bool:
        return request.request_id not in blocked

    sched = make_scheduler(ready=ready)
    runner = PagedFakeRunner(64, 4)
    sched.add_request(core_request("compiling", [1, 2], arrival=0.0, max_tokens=2))
    sched.add_request(core_request("next", [3, 4], arrival=1.0, max_tokens=2))
    assert admission_order(sched, runner, 1) == ["next"]
    waiting = sched.get_request("compiling")
    assert waiting is not None and waiting.status is RequestStatus.WAITING
    assert sched.stats().num_waiting == 1
    blocked.clear()
    assert admission_order(sched, runner, 1) == ["compiling"]
    run_to_completion(sched, runner)
    assert_no_leak(sched.kv)


def test_a_constrained_request_is_not_planned_while_its_token_is_in_flight() -> None:
    """Async scheduling: a request with structured output waits for its previous token (no
    placeholder), an unconstrained one gets a placeholder; both produce the synchronous tokens."""
    def run(async_scheduling: bool) -> tuple[dict[str, list[int]], PagedFakeRunner]:
        sched = make_scheduler()
        runner = PagedFakeRunner(64, 4)
        sched.add_request(core_request("free", [1, 2, 3], max_tokens=6))
        sched.add_request(
            core_request("json", [4, 5, 6], max_tokens=6, structured_output={"regex": "[0-9]+"})
        )
        outputs = run_to_completion(sched, runner, async_scheduling=async_scheduling)
        assert_no_leak(sched.kv)
        return tokens_of(outputs), runner

    sync_tokens, _ = run(False)
    async_tokens, runner = run(True)
    assert async_tokens == sync_tokens
    with_placeholder = {
        e.req_id for s in runner.steps for e in s.requests if PLACEHOLDER_TOKEN_ID in e.token_ids
    }
    assert with_placeholder == {"free"}
