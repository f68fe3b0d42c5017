"""router.failover on its own: the circuit breaker's state machine (a controllable clock), backoff
bounds, bounded per-worker state, and the relay's resume request."""

from __future__ import annotations

import random

import pytest

from llmserve.v1 import generation_pb2 as gen_pb
from router.failover import BreakerState, CircuitBreakers, FailoverConfig, StreamRelay, backoff_s


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breakers(**kw: object) -> tuple[CircuitBreakers, Clock, list[tuple[str, BreakerState | None]]]:
    clock, changes = Clock(), []
    config = FailoverConfig(breaker_failure_threshold=3, breaker_cooldown_s=5.0, **kw)  # type: ignore[arg-type]
    return CircuitBreakers(config, clock, lambda w, s: changes.append((w, s))), clock, changes


def test_opens_after_consecutive_failures_then_half_open_probe_closes_it() -> None:
    b, clock, changes = breakers()
    b.record_failure("w")
    b.record_failure("w")
    assert b.state("w") is BreakerState.CLOSED and b.allow("w")
    b.record_failure("w")
    assert b.state("w") is BreakerState.OPEN and not b.allow("w")
    clock.now += 4.9
    assert not b.allow("w")
    clock.now += 0.2
    assert b.state("w") is BreakerState.HALF_OPEN
    assert b.allow("w"), "one probe"
    assert not b.allow("w"), "only one probe at a time"
    b.record_success("w")
    assert b.state("w") is BreakerState.CLOSED and b.allow("w") and b.allow("w")
    assert changes == [("w", BreakerState.OPEN), ("w", BreakerState.HALF_OPEN), ("w", BreakerState.CLOSED)]
    assert len(b) == 0, "a healthy worker holds no entry"


def test_a_success_resets_the_count_and_a_failed_probe_reopens() -> None:
    b, clock, _ = breakers()
    for _ in range(2):
        b.record_failure("w")
    b.record_success("w")
    b.record_failure("w")
    b.record_failure("w")
    assert b.state("w") is BreakerState.CLOSED, "failures must be consecutive"
    b.record_failure("w")
    clock.now += 5.0
    assert b.allow("w")
    b.record_failure("w")  # the probe failed: open again for a whole cool-down
    assert b.state("w") is BreakerState.OPEN and not b.allow("w")
    clock.now += 5.0
    assert b.allow("w")


def test_a_probe_without_verdict_frees_the_slot() -> None:
    b, clock, _ = breakers()
    for _ in range(3):
        b.record_failure("w")
    clock.now += 5.0
    assert b.allow("w") and not b.allow("w")
    b.release("w")  # the client cancelled: nothing learnt
    assert b.allow("w")


def test_state_is_bounded_by_the_fleet_and_the_cap() -> None:
    b, _, changes = breakers(max_tracked_workers=8)
    for i in range(100):
        b.record_failure(f"w{i}")
    assert len(b) == 8, "oldest entries evicted past the cap"
    b.sync(["w99", "w98", "live"])
    assert len(b) == 2
    exported = {w: s for w, s in changes}
    assert exported["live"] is BreakerState.CLOSED  # live workers are exported, healthy ones as 0
    b.sync(["live"])
    assert ("w99", None) in changes and len(b) == 0, "gone workers leave the gauge and the table"


def test_backoff_is_jittered_exponential_and_capped() -> None:
    config = FailoverConfig(retry_backoff_base_s=0.1, retry_backoff_max_s=0.5)
    rng = random.Random(0)
    for retry, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (10, 0.5)):
        draws = [backoff_s(retry, config, rng) for _ in range(200)]
        assert 0.0 <= min(draws) and max(draws) <= ceiling
        assert max(draws) > 0.8 * ceiling and min(draws) < 0.2 * ceiling  # spread over the range


@pytest.mark.parametrize("bad", [{"breaker_failure_threshold": 0}, {"keepalive_s": 0.5},
                                 {"retry_backoff_base_s": 2.0, "retry_backoff_max_s": 1.0}])
def test_config_is_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FailoverConfig(**bad)  # type: ignore[arg-type]


def _request(n: int = 1) -> gen_pb.GenerateRequest:
    return gen_pb.GenerateRequest(model="m", request_id="r", prompt_token_ids=gen_pb.TokenIds(ids=[1, 2, 3]),
                                  sampling=gen_pb.SamplingParams(max_tokens=10, n=n, seed=7, temperature=0.5))


def test_relay_resumes_with_the_tokens_sent() -> None:
    relay = StreamRelay(_request())
    assert relay.resumable and not relay.started
    assert relay.request_for_next_attempt() is relay.request
    for ids in ([5, 6], [7]):
        assert relay.forward(gen_pb.GenerateResponse(request_id="r", token_ids=ids, text="x")) is not None
    resumed = relay.request_for_next_attempt()
    assert list(resumed.resume.output_token_ids) == [5, 6, 7]
    assert list(resumed.prompt_token_ids.ids) == [1, 2, 3] and resumed.sampling == relay.request.sampling
    assert not relay.request.HasField("resume"), "the original request is left as it was"
    assert relay.left_to_generate() == 7 and not relay.done


def test_relay_hides_a_worker_abort_of_a_resumable_stream() -> None:
    relay = StreamRelay(_request())
    end = gen_pb.GenerateResponse(request_id="r", token_ids=[9], finish_reason="abort", worker_id="w")
    end.usage.completion_tokens = 1
    forwarded = relay.forward(end)
    assert forwarded is not None and list(forwarded.token_ids) == [9]
    assert not forwarded.finish_reason and not forwarded.HasField("usage") and not relay.done
    assert relay.aborted_by_worker and relay.sent_token_ids == [9]


def test_relay_of_several_samples_is_not_resumable() -> None:
    relay = StreamRelay(_request(n=2))
    end = gen_pb.GenerateResponse(request_id="r", index=1, finish_reason="abort")
    end.usage.completion_tokens = 1
    assert relay.forward(end) is end and relay.done and not relay.resumable


def _prompt_logprobs(token_ids: list[int]) -> gen_pb.GenerateResponse:
    """A message of prompt logprobs (no token), one entry per position."""
    return gen_pb.GenerateResponse(request_id="r", prompt_logprobs=[
        gen_pb.TokenLogprobs(token_id=t, logprob=-1.0, rank=1) for t in token_ids])


def test_relay_forwards_prompt_logprobs_and_resumes_only_with_all_or_none_sent() -> None:
    """Prompt logprobs (prompt [1, 2, 3]: positions 2 and 3) start the stream; a resumed request
    gets none, so a stream that relayed only part of them cannot be resumed, one with all can
    (its resume is set even before the first token: the worker then computes none again)."""
    request = _request()
    request.sampling.prompt_logprobs = 2
    relay = StreamRelay(request)
    first = _prompt_logprobs([2])
    assert relay.forward(first) is first and relay.started
    assert relay.sent_prompt_logprobs == 1 and not relay.resumable
    relay.forward(_prompt_logprobs([3]))
    assert relay.sent_prompt_logprobs == 2 and relay.resumable and relay.sent_token_ids == []
    resumed = relay.request_for_next_attempt()
    assert resumed.HasField("resume") and list(resumed.resume.output_token_ids) == []
    assert resumed.sampling.prompt_logprobs == 2, "the worker drops them for a resumed request"


def test_relay_passes_a_worker_abort_through_after_part_of_the_prompt_logprobs() -> None:
    request = _request()
    request.sampling.prompt_logprobs = 0
    relay = StreamRelay(request)
    relay.forward(_prompt_logprobs([2]))
    end = gen_pb.GenerateResponse(request_id="r", finish_reason="abort", worker_id="w")
    end.usage.completion_tokens = 0
    assert relay.forward(end) is end and relay.done and not relay.aborted_by_worker
