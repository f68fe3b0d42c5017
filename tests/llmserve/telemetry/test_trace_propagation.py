"""One request client -> router -> worker over real grpc.aio servers makes one trace."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from llmserve.telemetry import spans as s
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from tests.llmserve.telemetry.telemetry_stack import (
    CACHED_TOKENS,
    DEAD_WORKER_ID,
    HANG,
    MODEL,
    WORKER_ID,
    Stack,
)

GENERATE = "/llmserve.v1.Generation/Generate"


def _request(max_tokens: int, request_id: str = "req-1") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=MODEL, prompt_token_ids=pb.TokenIds(ids=[5, 6, 7, 8]), request_id=request_id,
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.5, seed=7),
    )


async def _generate(stack: Stack, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    async with stack.channel(stack.router_addr) as channel:
        return [chunk async for chunk in pb_grpc.GenerationStub(channel).Generate(request)]


def _service(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"])


def _one(
    spans: Sequence[ReadableSpan], name: str, service: str, kind: SpanKind | None = None
) -> ReadableSpan:
    found = [
        x for x in spans if x.name == name and _service(x) == service and (kind is None or x.kind == kind)
    ]
    assert len(found) == 1, [(x.name, _service(x), x.kind) for x in spans]
    return found[0]


def _parent_id(span: ReadableSpan) -> int:
    assert span.parent is not None, span.name
    return span.parent.span_id


async def _finished_spans_when(
    stack: Stack, ready: Callable[[Sequence[ReadableSpan]], bool]
) -> Sequence[ReadableSpan]:
    """The finished spans once ``ready`` holds for them (bounded wait; no timing is asserted)."""
    for _ in range(1000):
        spans = stack.exporter.get_finished_spans()
        if ready(spans):
            return spans
        await asyncio.sleep(0.01)
    raise AssertionError(f"spans never got ready: {[x.name for x in stack.exporter.get_finished_spans()]}")


ONE_REQUEST_SPANS = {
    ("client", GENERATE),
    ("router", GENERATE),
    ("router", s.ROUTER_GENERATE_SPAN),
    ("worker", GENERATE),
    ("worker", s.WORKER_GENERATE_SPAN),
    ("worker", s.WORKER_QUEUE_SPAN),
    ("worker", s.WORKER_PREFILL_SPAN),
    ("worker", s.WORKER_DECODE_SPAN),
}


async def _one_request_spans(stack: Stack) -> Sequence[ReadableSpan]:
    """The spans of one finished request: a span ends in its own task after the RPC's status
    arrives (the CLIENT span's watcher), so the last chunk can reach the test before it."""
    return await _finished_spans_when(
        stack, lambda spans: {(_service(x), x.name) for x in spans} >= ONE_REQUEST_SPANS
    )


async def test_one_trace_across_client_router_worker(stack: Stack) -> None:
    chunks = await _generate(stack, _request(max_tokens=3))
    assert [c.token_ids[0] for c in chunks if c.token_ids] == [0, 1, 2]
    assert chunks[-1].worker_id == WORKER_ID

    spans = await _one_request_spans(stack)
    assert len({x.context.trace_id for x in spans}) == 1
    assert {(_service(x), x.name) for x in spans} == ONE_REQUEST_SPANS
    # The parent chain: client -> router server -> router generate -> router clients -> worker.
    client = _one(spans, GENERATE, "client", SpanKind.CLIENT)
    router_server = _one(spans, GENERATE, "router", SpanKind.SERVER)
    router_gen = _one(spans, s.ROUTER_GENERATE_SPAN, "router")
    router_clients = [x for x in spans if _service(x) == "router" and x.kind == SpanKind.CLIENT]
    worker_server = _one(spans, GENERATE, "worker", SpanKind.SERVER)
    worker_gen = _one(spans, s.WORKER_GENERATE_SPAN, "worker")
    assert client.parent is None
    assert _parent_id(router_server) == client.context.span_id
    assert _parent_id(router_gen) == router_server.context.span_id
    assert len(router_clients) == 2  # the failed attempt on the dead worker, then the good one
    assert all(_parent_id(x) == router_gen.context.span_id for x in router_clients)
    failed = [x for x in router_clients if x.status.status_code == StatusCode.ERROR]
    assert len(failed) == 1
    ok_client = next(x for x in router_clients if x is not failed[0])
    assert _parent_id(worker_server) == ok_client.context.span_id
    assert _parent_id(worker_gen) == worker_server.context.span_id
    for stage in (s.WORKER_QUEUE_SPAN, s.WORKER_PREFILL_SPAN, s.WORKER_DECODE_SPAN):
        assert _parent_id(_one(spans, stage, "worker")) == worker_gen.context.span_id


async def test_router_span_attributes_and_events(stack: Stack) -> None:
    await _generate(stack, _request(max_tokens=3))
    span = _one(await _one_request_spans(stack), s.ROUTER_GENERATE_SPAN, "router")
    attrs = dict(span.attributes or {})
    assert attrs == {
        s.GEN_AI_OPERATION_NAME: "text_completion",
        s.GEN_AI_REQUEST_MODEL: MODEL,
        s.LLMSERVE_REQUEST_ID: "req-1",
        s.GEN_AI_RESPONSE_ID: "req-1",
        s.LLMSERVE_ROUTE_POLICY: "prefix",
        s.LLMSERVE_ROUTE_NUM_CANDIDATES: 2,
        s.LLMSERVE_ROUTE_WORKER_ID: WORKER_ID,
        s.LLMSERVE_ROUTE_REASON: "load",
        s.LLMSERVE_ROUTE_NUM_RETRIES: 1,
        s.GEN_AI_USAGE_INPUT_TOKENS: 4,
        s.GEN_AI_USAGE_OUTPUT_TOKENS: 3,
        s.LLMSERVE_USAGE_CACHED_TOKENS: CACHED_TOKENS,
        s.GEN_AI_RESPONSE_FINISH_REASONS: ("length",),
    }
    events = [(e.name, dict(e.attributes or {})) for e in span.events]
    assert events == [
        (s.EVENT_ROUTE_CANDIDATE, {s.LLMSERVE_WORKER_ID: DEAD_WORKER_ID, s.LLMSERVE_ROUTE_SCORE: 0.9,
                                   s.LLMSERVE_ROUTE_MATCHED_PREFIX_BLOCKS: 3, s.LLMSERVE_ROUTE_LOAD: 0.0}),
        (s.EVENT_ROUTE_CANDIDATE, {s.LLMSERVE_WORKER_ID: WORKER_ID, s.LLMSERVE_ROUTE_SCORE: 0.5,
                                   s.LLMSERVE_ROUTE_MATCHED_PREFIX_BLOCKS: 1, s.LLMSERVE_ROUTE_LOAD: 2.0}),
        (s.EVENT_RETRY, {s.LLMSERVE_RETRY_ATTEMPT: 1, s.LLMSERVE_WORKER_ID: DEAD_WORKER_ID,
                         s.LLMSERVE_ERROR_MESSAGE: "UNAVAILABLE"}),
    ]
    assert span.status.status_code == StatusCode.UNSET


async def test_worker_span_attributes_and_stage_events(stack: Stack) -> None:
    await _generate(stack, _request(max_tokens=3))
    spans = await _one_request_spans(stack)
    span = _one(spans, s.WORKER_GENERATE_SPAN, "worker")
    attrs = dict(span.attributes or {})
    ttft, queue = attrs.pop(s.LLMSERVE_TIME_TO_FIRST_TOKEN_S), attrs.pop(s.LLMSERVE_QUEUE_TIME_S)
    assert isinstance(ttft, float) and isinstance(queue, float) and 0 <= queue <= ttft
    assert attrs == {
        s.GEN_AI_OPERATION_NAME: "text_completion",
        s.GEN_AI_REQUEST_MODEL: MODEL,
        s.LLMSERVE_REQUEST_ID: "req-1",
        s.GEN_AI_RESPONSE_ID: "req-1",
        s.GEN_AI_REQUEST_MAX_TOKENS: 3,
        s.GEN_AI_REQUEST_TEMPERATURE: 0.5,
        s.GEN_AI_REQUEST_SEED: 7,
        s.LLMSERVE_WORKER_ID: WORKER_ID,
        s.GEN_AI_USAGE_INPUT_TOKENS: 4,
        s.GEN_AI_USAGE_OUTPUT_TOKENS: 3,
        s.LLMSERVE_USAGE_CACHED_TOKENS: CACHED_TOKENS,
        s.GEN_AI_RESPONSE_FINISH_REASONS: ("length",),
    }
    names = [e.name for e in span.events]
    assert names == [s.EVENT_QUEUED, s.EVENT_SCHEDULED, s.EVENT_FIRST_TOKEN, s.EVENT_FINISHED]
    times = [e.timestamp for e in span.events]
    assert times == sorted(times)
    queue_span = _one(spans, s.WORKER_QUEUE_SPAN, "worker")
    prefill = _one(spans, s.WORKER_PREFILL_SPAN, "worker")
    decode = _one(spans, s.WORKER_DECODE_SPAN, "worker")
    # Stages tile the request: queue ends where prefill starts, prefill ends where decode starts.
    assert queue_span.start_time == times[0] and queue_span.end_time == prefill.start_time == times[1]
    assert prefill.end_time == decode.start_time == times[2]


async def test_health_checks_make_no_spans(stack: Stack) -> None:
    for addr in (stack.router_addr, stack.worker_addr):
        async with stack.channel(addr) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert stack.exporter.get_finished_spans() == ()


async def test_each_request_gets_its_own_trace(stack: Stack) -> None:
    for i in range(3):
        await _generate(stack, _request(max_tokens=2, request_id=f"r{i}"))
    spans = await _finished_spans_when(
        stack, lambda spans: sum(x.name == s.WORKER_GENERATE_SPAN for x in spans) == 3
        and sum(x.name == s.ROUTER_GENERATE_SPAN for x in spans) == 3
    )
    by_request = {
        str((x.attributes or {})[s.LLMSERVE_REQUEST_ID]): x.context.trace_id
        for x in spans if x.name == s.WORKER_GENERATE_SPAN
    }
    assert len(by_request) == 3 and len(set(by_request.values())) == 3
    routers = {str((x.attributes or {})[s.LLMSERVE_REQUEST_ID]): x.context.trace_id
               for x in spans if x.name == s.ROUTER_GENERATE_SPAN}
    assert routers == by_request


async def test_cancelled_call_ends_client_and_worker_spans(stack: Stack) -> None:
    async with stack.channel(stack.worker_addr) as channel:
        call = pb_grpc.GenerationStub(channel).Generate(_request(max_tokens=5, request_id=HANG + "1"))
        assert list((await call.read()).token_ids) == [0]
        call.cancel()
        # client CLIENT span, worker SERVER span, worker generate span
        spans = await _finished_spans_when(stack, lambda spans: len(spans) == 3)
    client = _one(spans, GENERATE, "client", SpanKind.CLIENT)
    assert client.status.status_code == StatusCode.ERROR
    assert (client.attributes or {})["rpc.grpc.status_code"] == 1  # CANCELLED
    server = _one(spans, GENERATE, "worker", SpanKind.SERVER)
    assert _parent_id(server) == client.context.span_id
    worker_gen = _one(spans, s.WORKER_GENERATE_SPAN, "worker")
    assert [e.name for e in worker_gen.events] == [s.EVENT_CANCELLED]
    assert worker_gen.status.status_code == StatusCode.UNSET
