"""The typed client (sync and asyncio) against a real worker on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from llmserve.client import (
    AsyncClient,
    Client,
    CompletionCollector,
    LLMServeError,
    TokenLogprob,
    build_request,
    chunk_from_proto,
)
from llmserve.v1 import generation_pb2 as pb
from tests.llmserve.loopback_worker import loopback_worker

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "tiny-client"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def target(tiny_model: Callable[[str], Path]) -> AsyncIterator[str]:
    async with loopback_worker(tiny_model("qwen2"), MODEL, num_kv_blocks=256) as address:
        yield address


async def test_async_generate_streams_deltas_and_complete_collects_them(target: str) -> None:
    async with AsyncClient(target, timeout_s=60) as client:
        chunks = [
            c async for c in client.generate(MODEL, "Hello", max_tokens=9, temperature=0, ignore_eos=True)
        ]
        whole = await client.complete(MODEL, "Hello", max_tokens=9, temperature=0, ignore_eos=True)
    assert len(chunks) >= 2  # streamed, not one blob
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids and len(whole.token_ids) == 9
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9
    assert whole.sequences[0].finish_reason == "length" and whole.worker_id


async def test_sync_client_n_and_chat(target: str) -> None:
    def run() -> tuple[object, object]:
        with Client(target, timeout_s=60) as client:
            many = client.complete(MODEL, "Hi", n=3, max_tokens=5, temperature=1.0, seed=7, ignore_eos=True)
            chat = client.complete(
                MODEL,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
                temperature=0,
                ignore_eos=True,
            )
            return many, chat

    many, chat = await asyncio.to_thread(run)
    assert [s.index for s in many.sequences] == [0, 1, 2]  # type: ignore[attr-defined]
    assert all(len(s.token_ids) == 5 for s in many.sequences)  # type: ignore[attr-defined]
    assert many.usage.completion_tokens == 15  # type: ignore[attr-defined]
    assert len(chat.token_ids) == 4  # type: ignore[attr-defined]


async def test_errors_carry_the_grpc_status(target: str) -> None:
    async with AsyncClient(target) as client:
        with pytest.raises(LLMServeError) as err:
            await client.complete("no-such-model", "Hi")
        assert err.value.code == grpc.StatusCode.NOT_FOUND and MODEL in err.value.details
        with pytest.raises(LLMServeError) as err:
            await client.complete(MODEL, "Hi", top_p=3.0)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.value.details
        with pytest.raises(LLMServeError) as err:
            await client.complete(MODEL, "Hi", max_tokens=400, ignore_eos=True, n=8, timeout_s=0.3)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    def sync_error() -> LLMServeError:
        with Client(target) as client, pytest.raises(LLMServeError) as err:
            client.complete(MODEL, prompt_token_ids=[1, -1])
        return err.value

    assert (await asyncio.to_thread(sync_error)).code == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_models(target: str) -> None:
    async with AsyncClient(target) as client:
        [model] = await client.list_models()
    assert (model.name, model.max_model_len, model.num_workers) == (MODEL, 512, 1)
    sync_models = await asyncio.to_thread(lambda: Client(target).list_models())
    assert sync_models == [model]


async def test_build_request_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        build_request(MODEL)
    with pytest.raises(TypeError, match="temprature"):
        build_request(MODEL, "hi", temprature=0.5)
    req = build_request(MODEL, "hi", stop="END", logit_bias={5: -1.0}, max_tokens=3)
    assert list(req.sampling.stop) == ["END"] and dict(req.sampling.logit_bias) == {5: -1.0}
    assert req.sampling.HasField("max_tokens") and not req.sampling.HasField("temperature")


async def test_prompt_logprobs_pieces_are_concatenated() -> None:
    """``prompt_logprobs=N`` is a sampling keyword; the stream's pieces of the prompt's logprobs
    (messages with no token, before the first token) become one ``Completion.prompt_logprobs``."""
    assert build_request(MODEL, "hi", prompt_logprobs=2).sampling.prompt_logprobs == 2
    collector = CompletionCollector()
    for ids in ([11, 12], [13]):
        piece = pb.GenerateResponse(request_id="r", prompt_logprobs=[
            pb.TokenLogprobs(token_id=t, logprob=-1.5, rank=2, top=[pb.TopLogprob(token_id=9, logprob=-0.5,
                                                                                  token="x")])
            for t in ids])
        collector.add(chunk_from_proto(piece))
    collector.add(chunk_from_proto(pb.GenerateResponse(request_id="r", text="a", token_ids=[5],
                                                       finish_reason="length")))
    done = collector.result()
    assert [lp.token_id for lp in done.prompt_logprobs] == [11, 12, 13]
    assert done.prompt_logprobs[0] == TokenLogprob(11, -1.5, 2, ((9, -0.5, "x"),))
    assert done.token_ids == [5] and done.text == "a" and len(done.sequences) == 1
