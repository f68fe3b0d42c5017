"""Device time per request: each step's time split over its requests by tokens (Scheduler.update)."""

from __future__ import annotations

import pytest

from gpu_worker.core.types import EngineCoreOutput, FinishReason
from tests.gpu_worker.core.core_fakes import PagedFakeRunner, assert_no_leak, core_request, make_scheduler


def _by_request(outputs: list[EngineCoreOutput]) -> dict[str, float]:
    return {o.request_id: o.device_s for o in outputs}


def test_a_step_is_split_by_the_tokens_each_request_computed() -> None:
    sched = make_scheduler()
    runner = PagedFakeRunner(64, 4)
    sched.add_request(core_request("a", range(9), max_tokens=3))
    sched.add_request(core_request("b", range(100, 103), max_tokens=3))
    plan = sched.schedule()
    assert {e.req_id: len(e.token_ids) for e in plan.requests} == {"a": 9, "b": 3}
    first = _by_request(sched.update(plan, runner.execute(plan), device_s=1.2))
    assert first == pytest.approx({"a": 0.9, "b": 0.3})
    plan = sched.schedule()  # two decodes: one token each
    second = _by_request(sched.update(plan, runner.execute(plan), device_s=0.5))
    assert second == pytest.approx({"a": 0.25, "b": 0.25})
    assert sched.stats().device_seconds == pytest.approx(1.7)


def test_chunks_without_an_output_are_carried_to_the_next_output() -> None:
    sched = make_scheduler(max_num_batched_tokens=4)
    runner = PagedFakeRunner(64, 4)
    sched.add_request(core_request("a", range(10), max_tokens=2))
    seen: list[float] = []
    for step_s in (0.4, 0.4, 0.2):  # chunks of 4, 4, 2 tokens: only the last samples
        plan = sched.schedule()
        outputs = sched.update(plan, runner.execute(plan), device_s=step_s)
        seen.extend(o.device_s for o in outputs)
    assert seen == pytest.approx([1.0])
    plan = sched.schedule()
    (last,) = sched.update(plan, runner.execute(plan), device_s=0.1)
    assert last.finish_reason is FinishReason.LENGTH and last.device_s == pytest.approx(0.1)
    assert sched.stats().device_seconds == pytest.approx(1.1)
    assert_no_leak(sched.kv)


def test_an_aborted_request_reports_what_it_was_given_since_its_last_output() -> None:
    sched = make_scheduler(max_num_batched_tokens=4)
    runner = PagedFakeRunner(64, 4)
    sched.add_request(core_request("a", range(10), max_tokens=4))
    plan = sched.schedule()
    assert sched.update(plan, runner.execute(plan), device_s=0.3) == []  # a chunk, no output yet
    (aborted,) = sched.abort(["a"])
    assert aborted.finish_reason is FinishReason.ABORT and aborted.device_s == pytest.approx(0.3)
    assert_no_leak(sched.kv)


def test_the_share_of_a_request_that_ended_before_the_results_is_dropped() -> None:
    # Async scheduling: step 2 is planned (a decode for "a" on a placeholder) before step 1's
    # results finish "a" by EOS; step 2's row for "a" is wasted and nobody is charged for it.
    sched = make_scheduler()
    runner = PagedFakeRunner(64, 4, script={"a": [7]})
    sched.add_request(core_request("a", range(4), eos=[7], max_tokens=8))
    sched.add_request(core_request("b", range(10, 14), max_tokens=8))
    step1 = sched.schedule()
    result1 = runner.execute(step1)
    step2 = sched.schedule()
    assert {e.req_id for e in step2.requests} == {"a", "b"}
    first = _by_request(sched.update(step1, result1, device_s=0.8))
    assert first == pytest.approx({"a": 0.4, "b": 0.4})
    second = _by_request(sched.update(step2, runner.execute(step2), device_s=0.2))
    assert second == pytest.approx({"b": 0.1})
    assert sched.stats().device_seconds == pytest.approx(0.9)


def test_no_time_given_means_no_time_attributed() -> None:
    sched = make_scheduler()
    runner = PagedFakeRunner(64, 4)
    sched.add_request(core_request("a", range(5), max_tokens=1))
    plan = sched.schedule()
    (out,) = sched.update(plan, runner.execute(plan))
    assert out.finished and out.device_s == 0.0
    assert sched.stats().device_seconds == 0.0
