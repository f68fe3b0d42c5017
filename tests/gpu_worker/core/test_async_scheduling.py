"""Async scheduling at the scheduler: step k+1 is planned before step k is accounted for.

The oracle comparison of every path lives in test_equivalence.py; these tests pin down
the cases only async scheduling has: a request preempted while a step samples for it, and
how much work is planned past a request's end.
"""

from __future__ import annotations

from gpu_worker.core.scheduler import Scheduler
from gpu_worker.core.types import PLACEHOLDER_TOKEN_ID, FinishReason, RunnerOutput, SchedulerOutput
from tests.gpu_worker.core.core_fakes import (
    PagedFakeRunner,
    assert_no_leak,
    core_request,
    make_scheduler,
    next_token,
)


def drive_async(
    sched: Scheduler, runner: PagedFakeRunner
) -> tuple[dict[str, list[int]], list[SchedulerOutput]]:
    """Run to completion one step ahead; returns tokens per request and the planned steps."""
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, FinishReason | None] = {}
    steps: list[SchedulerOutput] = []
    in_flight: tuple[SchedulerOutput, RunnerOutput] | None = None
    while sched.has_unfinished() or in_flight is not None:
        launched = None
        if sched.has_unfinished():
            out = sched.schedule()
            steps.append(out)
            launched = (out, runner.execute(out))
        if in_flight is not None:
            for o in sched.update(*in_flight):
                tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
                reasons[o.request_id] = o.finish_reason
        in_flight = launched
    assert all(r is not None for r in reasons.values())
    return tokens, steps


def greedy_oracle(prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        out.append(next_token(seq))
        seq.append(out[-1])
    return out


def test_preempted_while_in_flight_keeps_the_token_sampled_for_it() -> None:
    # 6 blocks of 4 tokens for three requests that each grow to 18 tokens: preemptions happen
    # while every running request has a step in flight.
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=3, max_model_len=24)
    runner = PagedFakeRunner(6, 4)
    prompts = {f"r{i}": [10 + i, 20 + i, 30 + i, 40 + i, 50 + i, 60 + i] for i in range(3)}
    for rid, prompt in prompts.items():
        sched.add_request(core_request(rid, prompt, max_tokens=12, ignore_eos=True))
    tokens, steps = drive_async(sched, runner)
    assert tokens == {rid: greedy_oracle(p, 12) for rid, p in prompts.items()}
    # Some request was preempted by the step planned right after one that sampled for it.
    sampled_then_preempted = [
        rid
        for before, after in zip(steps, steps[1:], strict=False)
        for rid in after.preempted_req_ids
        if any(e.req_id == rid and e.sample for e in before.requests)
    ]
    assert sampled_then_preempted
    assert sched.stats().num_preemptions >= len(sampled_then_preempted)
    assert_no_leak(sched.kv)


def test_no_work_planned_past_a_known_length_and_one_step_past_eos() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, max_model_len=64)
    runner = PagedFakeRunner(64, 4)
    prompt = [5, 6, 7]
    expected = greedy_oracle(prompt, 40)
    eos = expected[4]  # the 5th output token ends request "eos"
    sched.add_request(core_request("len", prompt, max_tokens=3, ignore_eos=True))
    sched.add_request(core_request("eos", prompt, eos=[eos], max_tokens=40))
    tokens, steps = drive_async(sched, runner)
    assert tokens == {"len": expected[:3], "eos": expected[:5]}

    def planned(rid: str) -> list[tuple[int, ...]]:
        return [e.token_ids for s in steps for e in s.requests if e.req_id == rid]

    # max_tokens=3: the prompt, then two decodes whose tokens were not known when planned.
    assert planned("len") == [tuple(prompt), (PLACEHOLDER_TOKEN_ID,), (PLACEHOLDER_TOKEN_ID,)]
    # EOS is only seen once sampled: the decode planned behind it is computed and dropped.
    assert len(planned("eos")) == 1 + 5
    assert_no_leak(sched.kv)
