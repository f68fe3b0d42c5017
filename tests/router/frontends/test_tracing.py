"""One trace from an HTTP client through the router to the worker: the caller's W3C
``traceparent`` is the parent of the OpenAI door's SERVER span, whose children reach the worker;
spans read from the OTLP receiver the ``llmserve up`` process exports to."""

from __future__ import annotations

import secrets
import time

from openai import OpenAI

from tests.helpers.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.router.frontends.stack_proc import MODEL, StackProc

SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
GENERATE = "/llmserve.v1.Generation/Generate"


def _spans_of(receiver: OtlpReceiver, trace_id: str,
              names: set[tuple[str, int | None]]) -> list[ReceivedSpan]:
    """The trace's spans once one of each ``(name, kind)`` in ``names`` arrived (``kind`` None: any).
    Each process exports in its own batches, so counting spans is not enough: the worker's stage
    spans (queue, prefill, decode) can arrive before the HTTP door's. Bounded wait; no timing is
    asserted."""
    deadline = time.monotonic() + 60
    while True:
        spans = [s for s in receiver.spans() if s.trace_id == trace_id]
        if all(any(s.name == n and (k is None or s.kind == k) for s in spans) for n, k in names):
            return spans
        assert time.monotonic() < deadline, [(s.name, s.kind) for s in spans]
        time.sleep(0.05)


def _one(spans: list[ReceivedSpan], name: str, kind: int | None = None) -> ReceivedSpan:
    found = [s for s in spans if s.name == name and (kind is None or s.kind == kind)]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def test_traceparent_continues_through_router_to_worker(stack: StackProc,
                                                        otlp_receiver: OtlpReceiver) -> None:
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    client = OpenAI(base_url=stack.openai_url, api_key="unused", max_retries=0,
                    default_headers={"traceparent": f"00-{trace_id}-{caller_span}-01"})
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=3, temperature=0)
    # http server, router generate, router -> worker client, worker server, worker generate (+ stages)
    spans = _spans_of(otlp_receiver, trace_id, {("POST /v1/chat/completions", SERVER),
                                                 ("llmserve.router.generate", None), (GENERATE, CLIENT),
                                                 (GENERATE, SERVER), ("llmserve.worker.generate", None)})
    http = _one(spans, "POST /v1/chat/completions", SERVER)
    router = _one(spans, "llmserve.router.generate")
    call = _one(spans, GENERATE, CLIENT)
    worker_server = _one(spans, GENERATE, SERVER)
    worker = _one(spans, "llmserve.worker.generate")
    assert http.parent_span_id == caller_span
    assert http.attributes["http.response.status_code"] == 200
    assert router.parent_span_id == http.span_id
    assert router.attributes["gen_ai.operation.name"] == "chat"
    assert router.attributes["llmserve.request.id"] == reply.id
    assert router.attributes["gen_ai.usage.output_tokens"] == 3
    assert call.parent_span_id == router.span_id
    assert worker_server.parent_span_id == call.span_id
    assert worker.parent_span_id == worker_server.span_id
    assert worker.attributes["llmserve.request.id"] == reply.id


def test_without_traceparent_a_new_trace_starts(stack: StackProc, otlp_receiver: OtlpReceiver) -> None:
    client = OpenAI(base_url=stack.openai_url, api_key="unused", max_retries=0)
    reply = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    deadline = time.monotonic() + 60
    while not (routers := [s for s in otlp_receiver.spans() if s.name == "llmserve.router.generate"
                           and s.attributes.get("llmserve.request.id") == reply.id]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    spans = _spans_of(otlp_receiver, routers[0].trace_id, {("POST /v1/completions", SERVER)})
    http = _one(spans, "POST /v1/completions", SERVER)
    assert http.parent_span_id == "" and routers[0].parent_span_id == http.span_id


def test_a_batch_of_prompts_has_one_router_span_per_prompt(stack: StackProc,
                                                           otlp_receiver: OtlpReceiver) -> None:
    trace_id = secrets.token_hex(16)
    client = OpenAI(base_url=stack.openai_url, api_key="unused", max_retries=0,
                    default_headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
    reply = client.completions.create(model=MODEL, prompt=["Hi", "Hello", "Hey"], max_tokens=2, temperature=0)
    deadline = time.monotonic() + 60
    while len(routers := [s for s in otlp_receiver.spans()
                          if s.trace_id == trace_id and s.name == "llmserve.router.generate"]) < 3:
        assert time.monotonic() < deadline, len(routers)
        time.sleep(0.05)
    route = "POST /v1/completions"
    http = _one(_spans_of(otlp_receiver, trace_id, {(route, SERVER)}), route, SERVER)
    ids = sorted(r.attributes["llmserve.request.id"] for r in routers)
    assert ids == [f"{reply.id}-{i}" for i in range(3)]
    assert all(r.parent_span_id == http.span_id and r.attributes["gen_ai.usage.output_tokens"] == 2
               for r in routers)
