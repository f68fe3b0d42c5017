"""The step plan and the step result round-trip through their byte messages exactly."""

from __future__ import annotations

import numpy as np

from gpu_worker.core.types import (
    GrammarBitmask,
    PromptLogprobs,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    TokenLogprobs,
)
from gpu_worker.executor.step_message import decode_output, decode_step, encode_output, encode_step
from gpu_worker.sampling_params import SamplingParams


def test_step_plan_round_trip() -> None:
    params = SamplingParams(temperature=0.5, top_k=3, stop=["x"], logit_bias={5: 1.5}, seed=3, n=1,
                            prompt_logprobs=2)
    new = ScheduledRequest("a#0", (1, 2, 3), 0, (4, 5), True, is_new=True, params=params, prompt_len=3,
                           output_token_ids=(9,), prompt_token_ids=(1, 2, 3))
    old = ScheduledRequest("b", (-1,), 17, (), True)  # a placeholder token (async scheduling)
    chunk = ScheduledRequest("c", (7, 8, 9, 10), 32, (11,), False)
    mask = np.arange(2 * 3, dtype=np.int32).reshape(2, 3) - 3
    plan = SchedulerOutput((new, old, chunk), 8, frozenset({"z", "y"}), frozenset({"w"}),
                           grammar=GrammarBitmask(("a#0", "b"), mask))
    got = decode_step(encode_step(plan))
    assert got.requests == plan.requests and got.num_scheduled_tokens == 8
    assert got.finished_req_ids == plan.finished_req_ids and got.preempted_req_ids == plan.preempted_req_ids
    assert got.grammar is not None and got.grammar.req_ids == ("a#0", "b")
    assert np.array_equal(got.grammar.bitmask, mask)
    assert decode_step(encode_step(SchedulerOutput((), 0))) == SchedulerOutput((), 0)


def test_step_result_round_trip() -> None:
    out = RunnerOutput(("a", "b"), (5, 7), (None, TokenLogprobs(7, -0.5, 1, ((7, -0.5), (3, -1.5)))))
    assert decode_output(encode_output(out)) == out


def test_a_prompt_only_step_result_round_trips() -> None:
    """A prefill chunk that samples nothing but computed prompt logprobs (a pipeline's sampling
    rank sends it too)."""
    lp = TokenLogprobs(4, -2.25, 3, ((1, -0.5), (2, -1.0)))
    prompt = (PromptLogprobs("a", 1, (lp, lp)), PromptLogprobs("b", 17, ()))
    out = RunnerOutput((), (), prompt_logprobs=prompt)
    assert decode_output(encode_output(out)) == out
