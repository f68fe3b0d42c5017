"""Token buckets per API key (requests/s, tokens/s) on a controlled clock."""

from __future__ import annotations

import pytest

from llmserve.security.rate_limit import REQUESTS_LIMIT, TOKENS_LIMIT, KeyLimiter, RateLimits


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_requests_per_second_with_a_burst_and_retry_after() -> None:
    clock = Clock()
    limiter = KeyLimiter(burst_s=2.0, clock=clock)
    limits = RateLimits(requests_per_s=2.0)
    assert [limiter.admit_request("a", limits) for _ in range(4)] == [None] * 4  # burst: 2/s x 2 s
    refusal = limiter.admit_request("a", limits)
    assert refusal is not None and refusal.limit == REQUESTS_LIMIT
    assert refusal.retry_after_s == pytest.approx(0.5)
    assert limiter.admit_request("b", limits) is None, "each key has its own bucket"
    clock.t = 0.5
    assert limiter.admit_request("a", limits) is None
    assert limiter.admit_request("a", limits) is not None


def test_a_request_larger_than_the_bucket_waits_for_a_full_bucket_and_leaves_a_debt() -> None:
    clock = Clock()
    limiter = KeyLimiter(burst_s=1.0, clock=clock)
    limits = RateLimits(tokens_per_s=100.0)
    assert limiter.admit_tokens("a", limits, 300) is None  # full bucket: admitted, 200 in debt
    refusal = limiter.admit_tokens("a", limits, 10)
    assert refusal is not None and refusal.limit == TOKENS_LIMIT
    assert refusal.retry_after_s == pytest.approx(2.1)
    clock.t = 2.1
    assert limiter.admit_tokens("a", limits, 10) is None


def test_unused_tokens_are_given_back() -> None:
    clock = Clock()
    limiter = KeyLimiter(clock=clock)
    limits = RateLimits(tokens_per_s=100.0)
    assert limiter.admit_tokens("a", limits, 100) is None
    assert limiter.admit_tokens("a", limits, 50) is not None
    limiter.give_back_tokens("a", limits, 80)  # the request used 20 of its 100
    assert limiter.admit_tokens("a", limits, 50) is None


def test_unlimited_and_validation() -> None:
    limiter = KeyLimiter()
    assert all(limiter.admit_request("a", RateLimits()) is None for _ in range(1000))
    with pytest.raises(ValueError):
        RateLimits(requests_per_s=0)
    with pytest.raises(ValueError):
        RateLimits(tokens_per_s=float("inf"))


def test_buckets_exist_only_for_retained_keys() -> None:
    limiter = KeyLimiter(clock=Clock())
    limits = RateLimits(requests_per_s=1.0)
    assert limiter.admit_request("gone", limits) is None
    assert limiter.admit_request("gone", limits) is not None
    limiter.retain(["kept"])
    assert limiter.admit_request("gone", limits) is None, "a dropped key starts again from a full bucket"
