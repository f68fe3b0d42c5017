"""The router's admission limits (issue 17, finding 5, at the router): refused before the prompt is
templated or tokenized, with the field the client sent (``messages``, not the
``prompt_token_ids`` the router forwards), counted in ``llmserve:router_refusals_total``; the
worker's own limits (``max_tokens`` beyond the context) pass through as INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llmserve.fleet.redis_store import RedisStateStore
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from tests.router.router_procs import RedisProc, WorkerProc, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "lima"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def router(module_redis: RedisProc, router_tiny_model: Path, tmp_path_factory: Any,
                 make_router: Any) -> AsyncIterator[Any]:
    worker = WorkerProc(router_tiny_model, MODEL, module_redis.url, tmp_path_factory.mktemp("logs"))
    store = RedisStateStore(module_redis.url)
    try:
        await asyncio.to_thread(worker.wait_serving)

        async def registered() -> bool:
            return len((await store.read_fleet()).workers) == 1

        await wait_until(registered)
        yield await make_router("prefix")
    finally:
        worker.stop()
        await store.close()


async def _refused(router: Any, request: gen_pb.GenerateRequest, *words: str) -> str:
    request.model = MODEL
    async with grpc.aio.insecure_channel(router.target, options=[("grpc.max_send_message_length", -1)]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in gen_grpc.GenerationStub(ch).Generate(request, timeout=60):
                pass
    details = err.value.details() or ""
    assert err.value.code() == INVALID, details
    for word in words:
        assert word in details, details
    return details


def _refusals(router: Any, limit: str) -> float:
    value = router.metrics.registry.get_sample_value(
        "llmserve:router_refusals_total", {"model": MODEL, "limit": limit})
    return value or 0.0


async def test_a_100000_turn_chat_is_refused_before_templating(router: Any) -> None:
    turns = [gen_pb.ChatMessage(role="user", content="hi") for _ in range(100_000)]
    await _refused(router, gen_pb.GenerateRequest(messages=gen_pb.ChatMessages(messages=turns)),
                   "messages is too large: 100000 turns", "max_chat_turns", "--max-chat-turns")
    assert _refusals(router, "max_chat_turns") == 1


async def test_a_chat_over_the_context_names_messages_not_prompt_token_ids(router: Any) -> None:
    turns = [gen_pb.ChatMessage(role="user", content="word " * 150) for _ in range(4)]
    details = await _refused(router, gen_pb.GenerateRequest(messages=gen_pb.ChatMessages(messages=turns)),
                             "messages is too long", "max_model_len")
    assert "prompt_token_ids" not in details
    assert _refusals(router, "max_model_len") == 1


async def test_request_id_and_n_are_bounded(router: Any) -> None:
    await _refused(router, gen_pb.GenerateRequest(prompt="Hi", request_id="r" * (1 << 20)),
                   "request_id is too large", "--max-request-id-len")
    await _refused(router, gen_pb.GenerateRequest(prompt="Hi", sampling=gen_pb.SamplingParams(n=100_000)),
                   "n is too large: 100000", "--max-n")
    assert _refusals(router, "max_n") == 1


async def test_stop_strings_and_formats_are_bounded_before_the_prompt_is_tokenized(router: Any) -> None:
    """The worker's limits of the same flags, checked first at the router (counted there)."""
    many_stops = gen_pb.SamplingParams(stop=[f"s{i}" for i in range(10_000)])
    await _refused(router, gen_pb.GenerateRequest(prompt="Hi", sampling=many_stops),
                   "stop is too large: 10000 strings", "--max-stop-strings")
    deep = '{"type":"array","items":' * 200 + "{}" + "}" * 200
    await _refused(router, gen_pb.GenerateRequest(prompt="Hi", sampling=gen_pb.SamplingParams(
        structured_output=gen_pb.StructuredOutput(json=deep))), "structured_output.json is nested too deeply",
        "--max-format-depth")
    assert (_refusals(router, "max_stop_strings"), _refusals(router, "max_format_depth")) == (1, 1)


async def test_the_workers_max_tokens_refusal_passes_through(router: Any) -> None:
    await _refused(router, gen_pb.GenerateRequest(prompt="Hi", sampling=gen_pb.SamplingParams(
        max_tokens=4294967295)), "max_tokens is too large: 4294967295", "max_model_len")


async def test_resume_is_internal(router: Any) -> None:
    request = gen_pb.GenerateRequest(prompt_token_ids=gen_pb.TokenIds(ids=[1, 2, 3]))
    request.resume.output_token_ids.extend([4, 5])
    await _refused(router, request, "resume is internal")
