"""The scheduler's side of prompt logprobs: gathering a request's positions across chunks and
recomputations, and not matching its prompt in the prefix cache while some are missing."""

from __future__ import annotations

import pytest

from gpu_worker.core.request import Request
from gpu_worker.core.types import TokenLogprobs
from gpu_worker.sampling_params import SamplingParams


def lps(*positions: int) -> tuple[TokenLogprobs, ...]:
    """Distinct records, one per position (the position is the token id)."""
    return tuple(TokenLogprobs(p, -float(p), 1) for p in positions)


def request(prompt_logprobs: int | None = 1, prompt_len: int = 6) -> Request:
    params = SamplingParams(max_tokens=4, prompt_logprobs=prompt_logprobs)
    return Request("r", range(100, 100 + prompt_len), params, block_size=4, hash_seed="s")


def test_chunks_gather_in_order_and_a_recomputation_adds_nothing_twice() -> None:
    req = request()
    assert req.needs_prompt_logprobs
    req.add_prompt_logprobs(1, lps(1, 2))  # chunk 0 .. 2: positions 1, 2
    req.add_prompt_logprobs(1, lps(1, 2, 3))  # recomputed after a preemption: only 3 is new
    req.add_prompt_logprobs(4, lps(4, 5))
    assert not req.needs_prompt_logprobs
    assert req.take_prompt_logprobs() == lps(1, 2, 3, 4, 5)
    assert req.take_prompt_logprobs() is None  # once


def test_a_gap_or_an_early_sample_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    """Neither happens in the scheduler's order; if a bug made one, the request gets what was
    gathered and the engine goes on."""
    req = request()
    req.add_prompt_logprobs(1, lps(1))
    req.add_prompt_logprobs(3, lps(3))
    assert "leave a gap after position 1" in caplog.text
    assert req.take_prompt_logprobs() == lps(1)
    assert "sampled with 1 of its 5 prompt logprobs" in caplog.text


def test_a_request_without_them_gathers_none() -> None:
    req = request(prompt_logprobs=None)
    req.add_prompt_logprobs(1, lps(1))
    assert not req.needs_prompt_logprobs and req.take_prompt_logprobs() is None
    assert not request(prompt_len=1).needs_prompt_logprobs  # a one-token prompt has no positions
