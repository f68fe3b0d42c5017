"""Per-request observability of the router: the Generate span, metrics and one log line.

:meth:`RouterTelemetry.observe` wraps the handling of one Generate::

    with telemetry.observe(request.model, request_id) as obs:
        model, workers = ...;  obs.set_model(model)
        ranked = ...;          obs.on_ranked(ranked)
        async for chunk in dispatcher.generate(..., observer=obs):   # on_attempt / on_failure
            obs.on_chunk(...)
            yield chunk

It opens ``llmserve.router.generate`` (a child of the gRPC SERVER span, so of the caller's
trace; the calls to workers made inside become its children), records the candidates, the
chosen worker and the retries, and when the block ends counts the request by model and outcome,
observes latency and TTFT, and writes one ``request finished`` log line. No protobuf and no
OpenTelemetry import here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from llmserve.telemetry.logging import log_request_finished
from llmserve.telemetry.metrics import RouterMetrics
from llmserve.telemetry.spans import RouterGenerateSpan
from llmserve.telemetry.tracing import Tracing
from router.errors import LimitRefused, ModelUnavailable, RouterError
from router.policy import Ranked

REQUEST_LOGGER = "llmserve.router"
UNKNOWN_MODEL = "unknown"  # metrics label of requests whose model never resolved (bounded cardinality)
RETRY_REASON = "retry"  # route reason of attempts after the first
ONLY_CANDIDATE = "only_candidate"
_CANCELLED = (asyncio.CancelledError, GeneratorExit)
_SHOWN_ID_CHARS = 256  # a longer request id (refused by max_request_id_len) is cut in spans and logs


@dataclass
class RequestObservation:
    """What one relayed request did so far; also the dispatcher's ``AttemptObserver``."""

    span: RouterGenerateSpan
    metrics: RouterMetrics
    policy: str
    request_id: str
    model: str = ""  # resolved model ("" until resolved)
    reason: str = ""
    worker_id: str = ""
    started_s: float = field(default_factory=time.monotonic)
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    device_s: float | None = None  # the serving worker's Usage.device_seconds (None: no usage came)
    finish_reasons: list[str] = field(default_factory=list)

    def set_model(self, model: str) -> None:
        self.model = model

    def on_ranked(self, ranked: Ranked) -> None:
        """The policy's ranking: every candidate with its score and cached prefix blocks."""
        self.reason = ONLY_CANDIDATE if len(ranked.candidates) == 1 else ranked.reason
        for candidate, score in zip(ranked.candidates, ranked.scores, strict=True):
            self.span.add_candidate(candidate.worker.worker_id, score, candidate.matched_blocks,
                                    load=candidate.load_score)

    def on_attempt(self, attempt: int, worker_id: str) -> None:
        reason = self.reason if attempt == 1 else RETRY_REASON
        self.worker_id = worker_id
        self.span.set_route(worker_id, reason)
        self.metrics.on_routing_decision(self.policy, reason)
        if attempt > 1:
            self.metrics.on_retry(self.model or UNKNOWN_MODEL)

    def on_failure(self, attempt: int, worker_id: str, error: str) -> None:
        self.span.add_retry(attempt, worker_id, error)

    def on_migration(self, attempt: int, worker_id: str, error: str) -> None:
        """Attempt ``attempt`` failed after its first token; the stream resumes on another worker."""
        self.span.add_retry(attempt, worker_id, f"mid-stream, resumed elsewhere: {error}")
        self.metrics.on_migration(self.model or UNKNOWN_MODEL)

    def on_chunk(self, has_tokens: bool, finish_reason: str = "") -> None:
        """A chunk reached the client (TTFT at the first one with tokens)."""
        if has_tokens and self.ttft_s is None:
            self.ttft_s = time.monotonic() - self.started_s
        if finish_reason:
            self.finish_reasons.append(finish_reason)

    def on_usage(
        self, *, prompt_tokens: int, completion_tokens: int, cached_tokens: int, worker_id: str,
        device_s: float | None = None,
    ) -> None:
        """The stream's last chunk: token counts, the serving worker and the device seconds it
        reported (a resumed stream: only the last worker's)."""
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self.cached_tokens = cached_tokens
        self.device_s = device_s
        self.worker_id = worker_id or self.worker_id
        self.span.set_usage(input_tokens=prompt_tokens, output_tokens=completion_tokens,
                            cached_tokens=cached_tokens, finish_reasons=self.finish_reasons,
                            device_seconds=device_s)


class RouterTelemetry:
    """Tracing, metrics and request logs of one router; one ``observe`` per Generate."""

    def __init__(self, tracing: Tracing, metrics: RouterMetrics, policy: str) -> None:
        self.tracing = tracing
        self.metrics = metrics
        self.policy = policy
        self._log = logging.getLogger(REQUEST_LOGGER)

    @contextmanager
    def observe(
        self, model: str, request_id: str, operation: str = "text_completion"
    ) -> Iterator[RequestObservation]:
        """Span, metrics and log line around one request; exceptions pass through. ``operation``
        is the GenAI operation name on the span (``text_completion``, ``chat``)."""
        request_id = _shown_id(request_id)
        with self.tracing.router_generate(model=model, request_id=request_id, policy=self.policy,
                                          operation=operation) as span:
            obs = RequestObservation(span, self.metrics, self.policy, request_id)
            outcome = "ok"
            try:
                yield obs
            except _CANCELLED:
                outcome = "cancelled"
                raise
            except RouterError as exc:
                outcome = exc.code.name.lower()
                span.set_error(str(exc))
                if isinstance(exc, ModelUnavailable) and not obs.model:
                    obs.model = model  # a model once served: a bounded label
                if isinstance(exc, LimitRefused):
                    self.metrics.on_refusal(obs.model or UNKNOWN_MODEL, exc.limit)
                raise
            except Exception:
                outcome = "internal"
                raise
            finally:
                self._finish(obs, outcome, span.trace_id, model)

    def _finish(self, obs: RequestObservation, outcome: str, trace_id: str, requested: str) -> None:
        e2e_s = time.monotonic() - obs.started_s
        self.metrics.on_request_finished(obs.model or UNKNOWN_MODEL, outcome, e2e_s=e2e_s, ttft_s=obs.ttft_s)
        log_request_finished(
            self._log, request_id=obs.request_id, trace_id=trace_id, model=obs.model or requested,
            worker=obs.worker_id, prompt_tokens=obs.prompt_tokens, completion_tokens=obs.completion_tokens,
            cached_tokens=obs.cached_tokens, ttft_s=obs.ttft_s, e2e_s=e2e_s,
            finish_reason=_finish_reason(outcome, obs.finish_reasons), device_s=obs.device_s,
        )


def _shown_id(request_id: str) -> str:
    if len(request_id) <= _SHOWN_ID_CHARS:
        return request_id
    return f"{request_id[:64]}...({len(request_id)} characters)"


def _finish_reason(outcome: str, reasons: Sequence[str]) -> str:
    """The sequences' finish reasons (comma list) when the request succeeded, else its outcome."""
    return ",".join(reasons) if outcome == "ok" and reasons else outcome
