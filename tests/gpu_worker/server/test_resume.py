"""Resuming a stream on a worker (``GenerateRequest.resume``, what a router sends when the worker
that started a stream died after its first token; issue 17, finding 6).

At every chunk boundary of an uninterrupted stream, a request resumed with the tokens sent so far
must continue with exactly the rest: the same token ids (greedy, and seeded sampling whose draws
continue at the resumed output index, with penalties that count the resumed tokens), and text
that, appended to the text already sent, equals the uninterrupted text (no character repeated or
lost at the seam, unfinished UTF-8 characters and stop strings included)."""

from __future__ import annotations

import grpc
import pytest

from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from tests.gpu_worker.server.worker_server_helpers import SERVED_NAME, Collected, collect, greedy

pytestmark = pytest.mark.asyncio(loop_scope="module")
PROMPT = [1, 504, 3458, 282, 4649, 314]


def _request(sampling: pb.SamplingParams, resumed: list[int] | None = None) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=SERVED_NAME, prompt_token_ids=pb.TokenIds(ids=PROMPT),
                                 sampling=sampling)
    if resumed is not None:
        request.resume.output_token_ids.extend(resumed)
    return request


def _text_request(prompt: str, sampling: pb.SamplingParams, resumed: list[int] | None = None
                  ) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=SERVED_NAME, prompt=prompt, sampling=sampling)
    if resumed is not None:
        request.resume.output_token_ids.extend(resumed)
    return request


async def _boundaries(gen: pb_grpc.GenerationStub, sampling: pb.SamplingParams) -> tuple[Collected, list]:
    """The uninterrupted stream and, at each chunk boundary before its end, (tokens so far,
    text so far): what a router has relayed when the worker dies there."""
    whole = await collect(gen.Generate(_request(sampling)))
    seams, tokens, text = [], [], ""
    for chunk in whole.chunks[:-1]:
        tokens, text = tokens + list(chunk.token_ids), text + chunk.text
        seams.append((tokens, text))
    return whole, seams


SAMPLINGS = {
    "greedy": greedy(40),
    "seeded with penalties": pb.SamplingParams(
        max_tokens=40, temperature=0.9, top_k=200, seed=77, ignore_eos=True, frequency_penalty=0.5,
        presence_penalty=0.3, repetition_penalty=1.2,
    ),
    "seeded min_tokens and logprobs": pb.SamplingParams(
        max_tokens=30, min_tokens=30, temperature=1.3, seed=5, logprobs=2,
    ),
}


@pytest.mark.parametrize("name", list(SAMPLINGS))
async def test_resumed_stream_continues_the_uninterrupted_one(gen: pb_grpc.GenerationStub, name: str) -> None:
    sampling = SAMPLINGS[name]
    whole, seams = await _boundaries(gen, sampling)
    assert len(whole.token_ids[0]) == sampling.max_tokens and len(seams) >= 8  # one chunk per token, mostly
    for sent_tokens, sent_text in seams:
        rest = await collect(gen.Generate(_request(sampling, sent_tokens)))
        assert sent_tokens + rest.token_ids[0] == whole.token_ids[0], f"seam after {len(sent_tokens)} tokens"
        assert sent_text + rest.text[0] == whole.text[0], f"seam after {len(sent_tokens)} tokens"
        assert rest.finish == whole.finish
        usage = rest.last.usage
        assert usage.prompt_tokens == len(PROMPT) and usage.completion_tokens == sampling.max_tokens
        if sampling.HasField("logprobs"):
            assert [lp.token_id for c in rest.chunks for lp in c.logprobs] == rest.token_ids[0]


async def test_text_prompt_and_stop_string_across_the_seam(gen: pb_grpc.GenerationStub) -> None:
    """A text prompt (the detokenizer's left context) and a stop string whose first characters
    may be held back before the seam (tests/gpu_worker/engine/test_resume_detokenize.py splits
    multibyte characters at every token)."""
    prompt = "Repeat: 🙂 数据 🙂 数据 🙂 数据 ünïcödé 🙂"
    sampling = pb.SamplingParams(max_tokens=48, temperature=1.0, seed=3, ignore_eos=True)
    whole = await collect(gen.Generate(_text_request(prompt, sampling)))
    text = whole.text[0]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop
    for params in (sampling, pb.SamplingParams(max_tokens=48, temperature=1.0, seed=3, ignore_eos=True,
                                               stop=[stop])):
        full = await collect(gen.Generate(_text_request(prompt, params)))
        tokens, sent = [], ""
        for chunk in full.chunks[:-1]:
            tokens, sent = tokens + list(chunk.token_ids), sent + chunk.text
            rest = await collect(gen.Generate(_text_request(prompt, params, tokens)))
            assert tokens + rest.token_ids[0] == full.token_ids[0]
            assert sent + rest.text[0] == full.text[0]
            assert rest.finish == full.finish and rest.last.stop_reason == full.last.stop_reason


RESUME_ERRORS = [
    ("n > 1", pb.SamplingParams(max_tokens=8, n=2), [5, 6], "resume needs n = 1"),
    ("nothing left", pb.SamplingParams(max_tokens=2), [5, 6], "leaves nothing to generate"),
    ("outside the vocabulary", pb.SamplingParams(max_tokens=8), [5, 10**8], "vocabulary"),
]


@pytest.mark.parametrize("case", RESUME_ERRORS, ids=[c[0] for c in RESUME_ERRORS])
async def test_bad_resume_is_invalid_argument(gen: pb_grpc.GenerationStub, case: tuple) -> None:
    _, sampling, resumed, words = case
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(gen.Generate(_request(sampling, resumed)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (err.value.details() or "")
