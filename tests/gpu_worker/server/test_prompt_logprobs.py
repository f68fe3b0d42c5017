"""Prompt logprobs through the worker's gRPC servicer: ``SamplingParams.prompt_logprobs`` decoded
(and dropped for a resumed request), the engine's vLLM-shaped list encoded into
``GenerateResponse.prompt_logprobs`` pieces of at most ``PROMPT_LOGPROBS_PER_MESSAGE`` positions
sent before the first token, and the values checked against the model's own generated logprobs."""

from __future__ import annotations

import pytest

from gpu_worker.outputs import Logprob
from gpu_worker.server.servicer import PROMPT_LOGPROBS_PER_MESSAGE, decode_generate, encode_prompt_logprobs
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from tests.gpu_worker.server.worker_server_helpers import SERVED_NAME, collect, greedy

PROMPT = [1, 504, 3458, 282, 4649, 314, 260, 1345]


def _ranked(token_id: int, rank: int, top: int) -> list[int]:
    """The ``top`` most likely ids at a position whose prompt token has ``rank``: ids 11.. but the
    prompt token's at its rank."""
    return [token_id if r == rank else 10 + r for r in range(1, top + 1)]


def _position(token_id: int, rank: int, top: int) -> dict[int, Logprob]:
    """A prompt position as the engine gives it: the prompt token and the ``top`` most likely
    tokens, listed in no particular order."""
    entry = {t: Logprob(-0.5 * r, r, f"t{t}") for r, t in enumerate(_ranked(token_id, rank, top), 1)}
    entry[token_id] = Logprob(-0.5 * rank, rank, f"t{token_id}")
    return dict(reversed(entry.items()))


def test_prompt_logprobs_are_encoded_in_pieces_from_the_second_token() -> None:
    positions = 2 * PROMPT_LOGPROBS_PER_MESSAGE + 451
    prompt = [100 + i for i in range(positions + 1)]
    engine = [None] + [_position(t, rank=1 + i % 7, top=3) for i, t in enumerate(prompt[1:])]
    messages = list(encode_prompt_logprobs("r", prompt, engine, top_n=2))
    assert [len(m.prompt_logprobs) for m in messages] == [PROMPT_LOGPROBS_PER_MESSAGE] * 2 + [451]
    assert all(m.request_id == "r" and m.index == 0 and not m.token_ids for m in messages)
    got = [lp for m in messages for lp in m.prompt_logprobs]
    assert [lp.token_id for lp in got] == prompt[1:]
    for i, lp in enumerate(got):
        assert lp.rank == 1 + i % 7 and lp.logprob == pytest.approx(-0.5 * lp.rank)
        top2 = _ranked(lp.token_id, lp.rank, 2)  # the top 2 of 3, most likely first
        assert [t.token_id for t in lp.top] == top2 and [t.token for t in lp.top] == [f"t{t}" for t in top2]
    assert list(encode_prompt_logprobs("r", [7], [None], top_n=2)) == []  # one token: nothing


def test_prompt_logprobs_are_decoded_and_dropped_for_a_resumed_request() -> None:
    request = pb.GenerateRequest(model=SERVED_NAME, prompt_token_ids=pb.TokenIds(ids=PROMPT),
                                 sampling=pb.SamplingParams(max_tokens=4, prompt_logprobs=5))
    assert decode_generate(request).params.prompt_logprobs == 5
    assert decode_generate(pb.GenerateRequest(prompt="x")).params.prompt_logprobs is None
    request.resume.SetInParent()  # a router resuming a stream that relayed all of them
    assert decode_generate(request).params.prompt_logprobs is None
    request.resume.output_token_ids.extend([5, 6])
    assert decode_generate(request).params.prompt_logprobs is None


@pytest.mark.asyncio(loop_scope="module")
async def test_prompt_logprobs_come_before_the_first_token_and_match_generated_ones(
    gen: pb_grpc.GenerationStub,
) -> None:
    """The prompt's logprobs arrive in messages with no token before the first token, one per
    position from the second; where the prompt continues with the model's own greedy tokens,
    their values are the logprobs those tokens got when generated; a resumed request gets none."""
    made = await collect(gen.Generate(pb.GenerateRequest(
        model=SERVED_NAME, prompt_token_ids=pb.TokenIds(ids=PROMPT), sampling=greedy(3, logprobs=0))))
    generated = [lp for c in made.chunks for lp in c.logprobs]
    prompt = PROMPT + made.token_ids[0]
    request = pb.GenerateRequest(model=SERVED_NAME, prompt_token_ids=pb.TokenIds(ids=prompt),
                                 sampling=greedy(2, prompt_logprobs=3))
    whole = await collect(gen.Generate(request))
    first_token = next(i for i, c in enumerate(whole.chunks) if c.token_ids)
    assert all(c.prompt_logprobs and not c.token_ids for c in whole.chunks[:first_token])
    assert not any(c.prompt_logprobs for c in whole.chunks[first_token:])
    got = [lp for c in whole.chunks for lp in c.prompt_logprobs]
    assert [lp.token_id for lp in got] == prompt[1:]
    for lp in got:
        assert len(lp.top) == 3 and lp.rank >= 1
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert lp.logprob <= lp.top[0].logprob + 1e-5
    for lp, made_lp in zip(got[len(PROMPT) - 1:], generated, strict=True):
        assert lp.token_id == made_lp.token_id
        assert lp.logprob == pytest.approx(made_lp.logprob, abs=1e-4)
    request.resume.output_token_ids.extend(whole.token_ids[0][:1])
    resumed = await collect(gen.Generate(request))
    assert not any(c.prompt_logprobs for c in resumed.chunks)
    assert made.token_ids[0] and resumed.token_ids[0] == whole.token_ids[0][1:]
