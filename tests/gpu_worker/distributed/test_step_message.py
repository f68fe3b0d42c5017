"""The step plan and the step result round-trip through their byte messages exactly."""

from __future__ import annotations

import numpy as np

from gpu_worker.core.types import (
    GrammarBitmask,
    ImageInput,
    PromptLogprobs,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    TokenLogprobs,
)
from gpu_worker.executor.step_message import decode_output, decode_step, encode_output, encode_step
from gpu_worker.sampling_params import SamplingParams
from llmserve.multimodal import ImageSpan


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


def test_new_requests_images_round_trip() -> None:
    """Pixels travel as raw float32 with their spans: each rank encodes the images itself."""
    rng = np.random.default_rng(0)
    first = ImageInput(ImageSpan(2, 4, b"\x01" * 16), rng.standard_normal((3, 4, 5)).astype(np.float32))
    second = ImageInput(ImageSpan(7, 4, b"\x02" * 16), rng.standard_normal((3, 2, 2)).astype(np.float32))
    third = ImageInput(ImageSpan(0, 4, b"\x03" * 16), rng.standard_normal((3, 4, 5)).astype(np.float32))
    a = ScheduledRequest("a", (1, 2, 9, 9), 0, (1,), False, is_new=True, params=SamplingParams(),
                         prompt_len=12, prompt_token_ids=tuple(range(12)), images=(first, second))
    b = ScheduledRequest("b", (5,), 3, (), True)
    c = ScheduledRequest("c", (9, 9), 0, (2,), False, is_new=True, params=SamplingParams(), prompt_len=6,
                         prompt_token_ids=(9,) * 6, images=(third,))
    got = decode_step(encode_step(SchedulerOutput((a, b, c), 7)))
    for sent, received in zip((a, b, c), got.requests, strict=True):
        assert len(received.images) == len(sent.images)
        for image, back in zip(sent.images, received.images, strict=True):
            assert back.span == image.span
            assert back.pixel_values.dtype == np.float32
            assert np.array_equal(back.pixel_values, image.pixel_values)


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
