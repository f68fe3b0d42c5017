"""The runner records a step's sampled ids when they arrive, after later steps were launched
(async scheduling): a row given up meanwhile and taken by another request must not receive the
old request's token; rows nobody gave up are recorded without checking their owners."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from gpu_worker.core.types import ScheduledRequest, SchedulerOutput
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.worker.request_state import UNKNOWN_TOKEN
from tests.gpu_worker.worker.conftest import make_runner

GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


def _new(req_id: str, prompt: tuple[int, ...], blocks: tuple[int, ...]) -> ScheduledRequest:
    return ScheduledRequest(req_id=req_id, token_ids=prompt, start_pos=0, block_ids=blocks, sample=True,
                            is_new=True, params=GREEDY, prompt_len=len(prompt))


def test_a_row_that_changed_hands_keeps_the_new_owners_tokens(tiny_model: Callable[[str], Path]) -> None:
    runner = make_runner(tiny_model("llama"))
    states = runner.states
    first = runner.execute_async(
        SchedulerOutput(requests=(_new("a", (5, 6, 7), (0,)),), num_scheduled_tokens=3))
    row = states.rows["a"]
    # "a" finishes before its token arrives; "b" (a 2-token prompt) takes its row.
    second = runner.execute_async(SchedulerOutput(
        requests=(_new("b", (8, 9), (1,)),), num_scheduled_tokens=2, finished_req_ids=frozenset({"a"})))
    assert states.rows["b"] == row and states.num_removals == 1
    out = first.result()
    assert out.req_ids == ("a",) and len(out.sampled_token_ids) == 1
    assert states.token_ids[row, 3] == UNKNOWN_TOKEN  # "a"'s token (position 3) was not written
    assert int(states.num_tokens[row]) == 2
    (token,) = second.result().sampled_token_ids
    assert states.token_ids[row, 2] == token and int(states.num_tokens[row]) == 3


def test_rows_nobody_gave_up_record_their_tokens(tiny_model: Callable[[str], Path]) -> None:
    runner = make_runner(tiny_model("llama"))
    states = runner.states
    step = SchedulerOutput(
        requests=(_new("a", (5, 6, 7), (0,)), _new("b", (8, 9), (1,))), num_scheduled_tokens=5)
    out = runner.execute_async(step).result()
    assert states.num_removals == 0
    rows = [states.rows[r] for r in ("a", "b")]
    np.testing.assert_array_equal(states.token_ids[rows, [3, 2]], out.sampled_token_ids)
    assert states.num_tokens[rows].tolist() == [4, 3]
