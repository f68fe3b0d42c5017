"""Recording implementations of the Generate spans (imported only when tracing is on).

This module imports the OpenTelemetry API at import time; ``llmserve.telemetry.tracing``
imports it lazily, so that tracing off never loads OpenTelemetry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from llmserve.telemetry import spans as s
from llmserve.telemetry.timeline import RequestTimeline

_CANCELLED = ("CancelledError", "GeneratorExit")


def _without_none(attributes: Mapping[str, AttributeValue | None]) -> dict[str, AttributeValue]:
    return {k: v for k, v in attributes.items() if v is not None}


class _SpanScope:
    """Starts a span, makes it current on enter, ends it on exit (recording any exception)."""

    def __init__(
        self, tracer: Tracer, name: str, attributes: dict[str, AttributeValue],
        kind: SpanKind = SpanKind.INTERNAL, parent: otel_context.Context | None = None,
    ) -> None:
        self._span: Span = tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
        self._token: object | None = None

    def _enter(self) -> None:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))

    def _exit(self, exc: BaseException | None) -> None:
        try:
            if exc is not None:
                if type(exc).__name__ in _CANCELLED:
                    # The client went away or the server is stopping: not an error of ours.
                    self._span.add_event(s.EVENT_CANCELLED)
                else:
                    self._span.record_exception(exc)
                    self._span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        finally:
            self._span.end()
            if self._token is not None:
                otel_context.detach(self._token)  # type: ignore[arg-type]
                self._token = None

    @property
    def trace_id(self) -> str:
        ctx = self._span.get_span_context()
        return format(ctx.trace_id, "032x") if ctx.is_valid and ctx.trace_flags.sampled else ""

    @property
    def is_recording(self) -> bool:
        return self._span.is_recording()

    def set_usage(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int = 0,
        finish_reasons: Sequence[str] = (),
        device_seconds: float | None = None,
        cost: float | None = None,
    ) -> None:
        self._span.set_attributes(_without_none(
            {
                s.GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
                s.GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
                s.LLMSERVE_USAGE_CACHED_TOKENS: cached_tokens,
                s.GEN_AI_RESPONSE_FINISH_REASONS: list(finish_reasons),
                s.LLMSERVE_USAGE_DEVICE_SECONDS: device_seconds,
                s.LLMSERVE_USAGE_COST: cost,
            }
        ))

    def set_error(self, message: str) -> None:
        self._span.set_attribute(s.LLMSERVE_ERROR_MESSAGE, message)
        self._span.set_status(Status(StatusCode.ERROR, message))


class OtelRouterGenerateSpan(_SpanScope, s.RouterGenerateSpan):
    """Recording ``RouterGenerateSpan``."""

    def __init__(self, tracer: Tracer, *, model: str, request_id: str, policy: str, operation: str) -> None:
        super().__init__(
            tracer,
            s.ROUTER_GENERATE_SPAN,
            {
                s.GEN_AI_OPERATION_NAME: operation,
                s.GEN_AI_REQUEST_MODEL: model,
                s.LLMSERVE_REQUEST_ID: request_id,
                s.GEN_AI_RESPONSE_ID: request_id,
                s.LLMSERVE_ROUTE_POLICY: policy,
            },
        )
        self._num_candidates = 0
        self._num_retries = 0

    def __enter__(self) -> OtelRouterGenerateSpan:
        self._enter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exit(exc)

    def add_candidate(
        self, worker_id: str, score: float, matched_prefix_blocks: int, *, load: float | None = None
    ) -> None:
        self._num_candidates += 1
        self._span.set_attribute(s.LLMSERVE_ROUTE_NUM_CANDIDATES, self._num_candidates)
        attributes: dict[str, Any] = {
            s.LLMSERVE_WORKER_ID: worker_id,
            s.LLMSERVE_ROUTE_SCORE: float(score),
            s.LLMSERVE_ROUTE_MATCHED_PREFIX_BLOCKS: int(matched_prefix_blocks),
        }
        if load is not None:
            attributes[s.LLMSERVE_ROUTE_LOAD] = float(load)
        self._span.add_event(s.EVENT_ROUTE_CANDIDATE, attributes)

    def set_route(self, worker_id: str, reason: str) -> None:
        self._span.set_attributes({s.LLMSERVE_ROUTE_WORKER_ID: worker_id, s.LLMSERVE_ROUTE_REASON: reason})

    def add_retry(self, attempt: int, worker_id: str, error: str) -> None:
        self._num_retries += 1
        self._span.set_attribute(s.LLMSERVE_ROUTE_NUM_RETRIES, self._num_retries)
        self._span.add_event(
            s.EVENT_RETRY,
            {
                s.LLMSERVE_RETRY_ATTEMPT: attempt,
                s.LLMSERVE_WORKER_ID: worker_id,
                s.LLMSERVE_ERROR_MESSAGE: error,
            },
        )


class OtelWorkerGenerateSpan(_SpanScope, s.WorkerGenerateSpan):
    """Recording ``WorkerGenerateSpan``."""

    def __init__(
        self, tracer: Tracer, *, model: str, request_id: str, operation: str,
        request_attributes: Mapping[str, AttributeValue | None],
    ) -> None:
        attributes: dict[str, AttributeValue] = {
            s.GEN_AI_OPERATION_NAME: operation,
            s.GEN_AI_REQUEST_MODEL: model,
            s.LLMSERVE_REQUEST_ID: request_id,
            s.GEN_AI_RESPONSE_ID: request_id,
        }
        attributes.update(_without_none(request_attributes))
        super().__init__(tracer, s.WORKER_GENERATE_SPAN, attributes)
        self._tracer = tracer

    def __enter__(self) -> OtelWorkerGenerateSpan:
        self._enter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exit(exc)

    def set_worker_id(self, worker_id: str) -> None:
        self._span.set_attribute(s.LLMSERVE_WORKER_ID, worker_id)

    def record_timeline(self, timeline: RequestTimeline) -> None:
        if not self._span.is_recording():
            return
        marks = [
            (s.EVENT_QUEUED, timeline.arrival_s),
            (s.EVENT_SCHEDULED, timeline.scheduled_s),
            (s.EVENT_FIRST_TOKEN, timeline.first_token_s),
            (s.EVENT_FINISHED, timeline.finished_s),
        ]
        for name, at_s in marks:
            if at_s is not None:
                self._span.add_event(name, timestamp=timeline.epoch_ns(at_s))
        if timeline.ttft_s is not None:
            self._span.set_attribute(s.LLMSERVE_TIME_TO_FIRST_TOKEN_S, timeline.ttft_s)
        if timeline.queue_s is not None:
            self._span.set_attribute(s.LLMSERVE_QUEUE_TIME_S, timeline.queue_s)
        stages = [
            (s.WORKER_QUEUE_SPAN, timeline.arrival_s, timeline.scheduled_s),
            (s.WORKER_PREFILL_SPAN, timeline.scheduled_s, timeline.first_token_s),
            (s.WORKER_DECODE_SPAN, timeline.first_token_s, timeline.last_token_s),
        ]
        parent = trace.set_span_in_context(self._span)
        for name, start_s, end_s in stages:
            if start_s is None or end_s is None:
                continue
            child = self._tracer.start_span(name, context=parent, start_time=timeline.epoch_ns(start_s))
            child.end(end_time=timeline.epoch_ns(end_s))


class OtelHttpServerSpan(_SpanScope, s.HttpServerSpan):
    """Recording ``HttpServerSpan``: a SERVER span whose parent is the W3C context of the headers."""

    def __init__(self, tracer: Tracer, *, method: str, route: str, headers: Mapping[str, str]) -> None:
        super().__init__(
            tracer,
            f"{method} {route}",
            {s.HTTP_REQUEST_METHOD: method, s.HTTP_ROUTE: route},
            kind=SpanKind.SERVER,
            parent=extract(headers),
        )

    def __enter__(self) -> OtelHttpServerSpan:
        self._enter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exit(exc)

    def set_status_code(self, status_code: int) -> None:
        self._span.set_attribute(s.HTTP_RESPONSE_STATUS_CODE, status_code)
        if status_code >= 500:
            self._span.set_status(Status(StatusCode.ERROR, f"HTTP {status_code}"))
