"""The shared request path (``router.generation``) and the OpenAI door's size limits, on a real
worker (tiny model) and a real router in this event loop: a request body over
``--max-http-body-bytes`` is refused (413) before it is read, a request whose message to the worker
would pass ``--max-message-bytes`` is refused (413 / INVALID_ARGUMENT) without touching the worker,
two callers may use the same request id at once, and whole OpenAI replies count as successes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from tests.router.inprocess import RouterStack, router_stack
from tests.router.router_procs import RedisProc

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "zeta"
BODY_LIMIT = 1 << 20
MESSAGE_LIMIT = 1 << 16  # the router's channels receive no tokenizer under it: prompts are token ids
PROMPT_IDS = [1, 2, 3, 4]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(module_redis: RedisProc, router_tiny_model: Path) -> AsyncIterator[RouterStack]:
    async with router_stack(module_redis.url, router_tiny_model, MODEL, max_http_body_bytes=BODY_LIMIT,
                            max_message_bytes=MESSAGE_LIMIT) as stack:
        yield stack


def _completion(**params: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 1, **params}


def _request(port: int, body: dict[str, Any]) -> urllib.request.Request:
    return urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                  headers={"content-type": "application/json"}, method="POST")


def _post(port: int, body: dict[str, Any]) -> tuple[int, Any]:
    request = _request(port, body)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:  # noqa: S310 - loopback
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _raw_post(port: int, head: bytes, body_parts: Any) -> tuple[int, dict[str, Any], int]:
    """Send ``head`` then as many of ``body_parts`` as the server takes before it answers (or
    closes); (status, JSON body, body bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        reply = b""
        for part in body_parts:
            try:
                reply += sock.recv(65536)
                break  # the server answered before the body ended
            except BlockingIOError:
                pass
            try:
                sock.sendall(part)
                sent += len(part)
            except OSError:
                break  # the server stopped reading (BlockingIOError: its buffers are full)
        sock.settimeout(30)
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            more = sock.recv(65536)
            if not more:
                break
            reply += more
    head_text, _, payload = reply.partition(b"\r\n\r\n")
    return int(head_text.split()[1]), json.loads(payload), sent


def _assert_body_refused(status: int, reply: dict[str, Any]) -> None:
    assert status == 413, reply
    message = reply["error"]["message"]
    assert reply["error"]["code"] == "request_too_large"
    assert f"the limit is {BODY_LIMIT} bytes" in message and "--max-http-body-bytes" in message, message


async def test_a_body_declared_too_large_is_refused_before_it_is_sent(stack: RouterStack) -> None:
    head = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 200000000\r\n\r\n")
    status, reply, _ = await asyncio.to_thread(_raw_post, stack.http_port, head, [b"{" + b" " * 1000])
    _assert_body_refused(status, reply)
    assert "200000000 bytes" in reply["error"]["message"]


async def test_a_chunked_body_is_refused_once_it_passes_the_limit(stack: RouterStack) -> None:
    head = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    chunk = b" " * 65536
    parts = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(256 * BODY_LIMIT // len(chunk)))
    status, reply, sent = await asyncio.to_thread(_raw_post, stack.http_port, head, parts)
    _assert_body_refused(status, reply)
    assert sent < 64 * BODY_LIMIT, f"refused after {sent} bytes: the server read on past its limit"
    assert stack.metric("llmserve:router_refusals_total", limit="max_http_body_bytes") >= 1
    status, _ = await asyncio.to_thread(_post, stack.http_port, _completion())
    assert status == 200, "the router still serves"


async def test_a_request_over_the_message_limit_never_reaches_a_worker(stack: RouterStack) -> None:
    # ~88 KB of logit_bias in a ~98 KB body: under the body limit, over the 64 KiB message limit
    bias = {str(token_id): 1.0 for token_id in range(8000)}
    status, reply = await asyncio.to_thread(_post, stack.http_port, _completion(logit_bias=bias))
    assert status == 413, reply
    message = reply["error"]["message"]
    assert f"the limit is {MESSAGE_LIMIT} bytes" in message and "--max-message-bytes" in message, message
    assert stack.metric("llmserve:router_refusals_total", limit="max_message_bytes") == 1
    assert stack.metric("llmserve:router_requests_total", outcome="resource_exhausted") == 0
    assert stack.metric("llmserve:router_retries_total") == 0, "not retried as a busy worker"


async def test_two_callers_may_use_the_same_request_id_at_once(stack: RouterStack) -> None:
    def request(max_tokens: int) -> gen_pb.GenerateRequest:
        return gen_pb.GenerateRequest(
            model=MODEL, prompt_token_ids=gen_pb.TokenIds(ids=PROMPT_IDS), request_id="order-1",
            sampling=gen_pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))

    async with grpc.aio.insecure_channel(stack.router.target) as channel:
        stub = gen_grpc.GenerationStub(channel)
        holder = stub.Generate(request(400), timeout=60)
        first = await holder.read()
        other = stub.Generate(request(400), timeout=60)
        other_first = await other.read()
        running = {rid for rid in stack.worker.service.in_flight if rid.startswith("order-1~")}
        assert len(running) == 2, f"both run at once on the worker, each under its own id: {running}"
        chunks = [first, *await _rest(holder), other_first, *await _rest(other)]
    assert {c.request_id for c in chunks} == {"order-1"}, "each client sees its own id"
    assert sum(c.usage.completion_tokens for c in chunks if c.HasField("usage")) == 800


async def _rest(call: Any) -> list[gen_pb.GenerateResponse]:
    chunks = []
    while (chunk := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        chunks.append(chunk)
    return chunks


async def test_whole_and_streamed_replies_count_as_successes(stack: RouterStack) -> None:
    def outcomes() -> dict[str, float]:
        return {o: stack.metric("llmserve:router_requests_total", model=MODEL, outcome=o)
                for o in ("ok", "cancelled")}

    before = outcomes()
    for stream in (False, True):
        body = _completion(max_tokens=2, stream=stream)
        status, _ = await asyncio.to_thread(_post_any, stack.http_port, body)
        assert status == 200
    after = outcomes()
    assert after["ok"] - before["ok"] == 2 and after["cancelled"] == before["cancelled"], (before, after)


def _post_any(port: int, body: dict[str, Any]) -> tuple[int, bytes]:
    """Status and raw body (a JSON reply or an SSE stream)."""
    with urllib.request.urlopen(_request(port, body), timeout=60) as reply:  # noqa: S310 - loopback
        return reply.status, reply.read()
