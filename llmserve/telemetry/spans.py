"""The Generate spans of router and worker, as servicers see them: no OpenTelemetry types.

``Tracing.router_generate(...)`` and ``Tracing.worker_generate(...)`` return one of these. The
classes here are the interface *and* the tracing-off implementation (every method does
nothing); ``llmserve.telemetry._otel_spans`` holds the recording subclasses, imported only when
tracing is on. Use them as context managers around the whole handling of a request, so that
spans made inside (the router's call to the worker) become children::

    with tracing.router_generate(model=req.model, request_id=rid, policy="prefix") as span:
        for c in decision.candidates:
            span.add_candidate(c.worker_id, c.score, c.matched_blocks, load=c.load)
        span.set_route(decision.worker_id, decision.reason)
        async for chunk in stub.Generate(req): ...
        span.set_usage(input_tokens=..., output_tokens=..., cached_tokens=..., finish_reasons=["stop"])

Attribute names follow the OpenTelemetry GenAI semantic conventions where one exists
(``gen_ai.*``) and use the ``llmserve.*`` namespace otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TypeVar

from llmserve.telemetry.timeline import RequestTimeline

# Span names.
ROUTER_GENERATE_SPAN = "llmserve.router.generate"
WORKER_GENERATE_SPAN = "llmserve.worker.generate"
WORKER_QUEUE_SPAN = "llmserve.worker.queue"
WORKER_PREFILL_SPAN = "llmserve.worker.prefill"
WORKER_DECODE_SPAN = "llmserve.worker.decode"
# HTTP SERVER spans (OpenAI door) are named "{method} {route}", as the HTTP conventions say.

# GenAI semantic-convention attributes.
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_REQUEST_CHOICE_COUNT = "gen_ai.request.choice.count"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"

# HTTP semantic-convention attributes.
HTTP_REQUEST_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"

# llmserve attributes.
LLMSERVE_REQUEST_ID = "llmserve.request.id"
LLMSERVE_USAGE_CACHED_TOKENS = "llmserve.usage.cached_tokens"
LLMSERVE_USAGE_DEVICE_SECONDS = "llmserve.usage.device_seconds"
LLMSERVE_USAGE_COST = "llmserve.usage.cost"
LLMSERVE_WORKER_ID = "llmserve.worker.id"
LLMSERVE_ROUTE_POLICY = "llmserve.route.policy"
LLMSERVE_ROUTE_WORKER_ID = "llmserve.route.worker_id"
LLMSERVE_ROUTE_REASON = "llmserve.route.reason"
LLMSERVE_ROUTE_NUM_CANDIDATES = "llmserve.route.num_candidates"
LLMSERVE_ROUTE_NUM_RETRIES = "llmserve.route.num_retries"
LLMSERVE_ROUTE_SCORE = "llmserve.route.score"
LLMSERVE_ROUTE_MATCHED_PREFIX_BLOCKS = "llmserve.route.matched_prefix_blocks"
LLMSERVE_ROUTE_LOAD = "llmserve.route.load"
LLMSERVE_RETRY_ATTEMPT = "llmserve.retry.attempt"
LLMSERVE_ERROR_MESSAGE = "llmserve.error.message"
LLMSERVE_TIME_TO_FIRST_TOKEN_S = "llmserve.time_to_first_token_s"
LLMSERVE_QUEUE_TIME_S = "llmserve.queue_time_s"

# Span event names.
EVENT_ROUTE_CANDIDATE = "llmserve.route.candidate"
EVENT_RETRY = "llmserve.route.retry"
EVENT_QUEUED = "queued"
EVENT_SCHEDULED = "scheduled"
EVENT_FIRST_TOKEN = "first_token"
EVENT_FINISHED = "finished"
EVENT_CANCELLED = "cancelled"


_SpanT = TypeVar("_SpanT", bound="_NoopContext")


class _NoopContext:
    """Context-manager part shared by the spans: enter returns the span, exit does nothing."""

    def __enter__(self: _SpanT) -> _SpanT:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    @property
    def trace_id(self) -> str:
        """The trace id as 32 hex digits ("" when tracing is off or the span is not sampled)."""
        return ""

    @property
    def is_recording(self) -> bool:
        """True when attributes set on this span are kept; lets callers skip costly preparation."""
        return False

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
        """Token counts and finish reasons of the finished request (one reason per sequence);
        the device seconds it used and their cost (``--device-cost-per-hour``), when known."""

    def set_error(self, message: str) -> None:
        """Mark the span failed (the request returned a gRPC error) with a short reason."""


class RouterGenerateSpan(_NoopContext):
    """The router's span for one Generate: routing decision, candidates, retries, usage."""

    def add_candidate(
        self,
        worker_id: str,
        score: float,
        matched_prefix_blocks: int,
        *,
        load: float | None = None,
    ) -> None:
        """One worker the policy considered: its score and the request's prefix blocks it has cached."""

    def set_route(self, worker_id: str, reason: str) -> None:
        """The worker chosen and why (``prefix_hit``, ``load``, ``round_robin``, ``hot_prefix_guard``,
        ``only_candidate``...). Call again after a retry picks another worker."""

    def add_retry(self, attempt: int, worker_id: str, error: str) -> None:
        """Attempt ``attempt`` (1-based) on ``worker_id`` failed with ``error``; the router retries."""


class WorkerGenerateSpan(_NoopContext):
    """The worker's span for one Generate: request parameters, stage events, usage."""

    def set_worker_id(self, worker_id: str) -> None:
        """The id of this worker (``llmserve.worker.id``)."""

    def record_timeline(self, timeline: RequestTimeline) -> None:
        """Add the request's stages: events ``queued``, ``scheduled`` (prefill start),
        ``first_token``, ``finished`` at their times, and child spans ``llmserve.worker.queue``,
        ``llmserve.worker.prefill``, ``llmserve.worker.decode`` covering them. Call once, when the
        request has finished (or failed), before leaving the ``with`` block."""


class HttpServerSpan(_NoopContext):
    """The SERVER span of one HTTP request (the router's OpenAI door), continuing the caller's
    W3C ``traceparent``; the router's Generate span opened inside becomes its child."""

    def set_status_code(self, status_code: int) -> None:
        """The HTTP status of the response (5xx marks the span failed)."""


NOOP_ROUTER_SPAN = RouterGenerateSpan()
"""Stateless; returned by a disabled ``Tracing`` so that tracing off allocates nothing."""

NOOP_WORKER_SPAN = WorkerGenerateSpan()
"""Stateless; returned by a disabled ``Tracing``."""

NOOP_HTTP_SERVER_SPAN = HttpServerSpan()
"""Stateless; returned by a disabled ``Tracing``."""
