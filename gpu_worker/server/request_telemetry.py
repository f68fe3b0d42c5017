"""Per-request observability of the worker: one Generate span, metrics and one log line.

:meth:`RequestTelemetry.observe` wraps the handling of one admitted Generate::

    with telemetry.observe(call) as observation:
        async for output in engine.generate(...):
            observation.on_output(output)
            yield output

It opens the ``llmserve.worker.generate`` span (a child of the gRPC SERVER span, itself
continuing the caller's W3C trace), marks a :class:`RequestTimeline` per sequence as delta
``RequestOutput``s arrive, and when the block ends sets usage and stage events on the span,
records ``WorkerMetrics.on_request_finished`` and writes one ``request finished`` log line. Span and
line carry the device seconds the request used (``RequestOutput.device_s``) and, when the
worker knows its device's price, their cost.
Domain objects only: no protobuf, no OpenTelemetry import.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from gpu_worker.server.types import GenerateCall
from llmserve.telemetry.logging import log_request_finished
from llmserve.telemetry.metrics import WorkerMetrics
from llmserve.telemetry.timeline import RequestTimeline
from llmserve.telemetry.tracing import Tracing

REQUEST_LOGGER = "llmserve.worker"
ABORT = "abort"  # finish reason of sequences cut short (client gone, drain, shutdown)
ERROR = "error"  # log-only finish reason of a request that failed with an exception
_COUNTED_REASONS = ("stop", "length", ABORT)
_CANCELLED = (asyncio.CancelledError, GeneratorExit)


@dataclass
class RequestObservation:
    """What one request did so far: a timeline and a finish reason per sequence, token counts."""

    arrival: RequestTimeline
    timelines: dict[int, RequestTimeline] = field(default_factory=dict)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    device_s: float = 0.0  # cumulative, as RequestOutput.device_s

    def on_output(self, output: Any) -> None:
        """Account one delta ``RequestOutput`` (new tokens per sequence, finish reasons)."""
        self.prompt_tokens = len(output.prompt_token_ids or ())
        self.cached_tokens = output.num_cached_tokens or 0
        self.device_s = getattr(output, "device_s", 0.0)
        for seq in output.outputs:
            timeline = self._timeline(seq.index)
            scheduled_s = getattr(output, "scheduled_s", None)  # when the engine reports it
            if scheduled_s is not None:
                timeline.mark_scheduled(scheduled_s)
            timeline.mark_tokens(len(seq.token_ids))
            if seq.finish_reason is not None:
                timeline.mark_finished()
                self.finish_reasons[seq.index] = str(seq.finish_reason)

    def _timeline(self, index: int) -> RequestTimeline:
        if index == 0:
            return self.arrival
        if index not in self.timelines:
            self.timelines[index] = RequestTimeline.start(arrival_s=self.arrival.arrival_s)
        return self.timelines[index]

    def end(self, reason_if_open: str) -> None:
        """The request is over: sequences without a finish reason get ``reason_if_open``."""
        for index, timeline in self.all_timelines():
            timeline.mark_finished()
            self.finish_reasons.setdefault(index, reason_if_open)

    def all_timelines(self) -> list[tuple[int, RequestTimeline]]:
        return [(0, self.arrival), *sorted(self.timelines.items())]

    @property
    def generation_tokens(self) -> int:
        return sum(t.num_generated_tokens for _, t in self.all_timelines())

    @property
    def reasons(self) -> list[str]:
        """Finish reasons in sequence order."""
        return [self.finish_reasons[i] for i in sorted(self.finish_reasons)]


class RequestTelemetry:
    """Tracing, metrics and request logs of the Generate calls one worker serves."""

    def __init__(self, tracing: Tracing, metrics: WorkerMetrics, model_name: str, worker_id: str) -> None:
        self.tracing = tracing
        self.metrics = metrics
        self.model_name = model_name
        self.worker_id = worker_id
        self._log = logging.getLogger(REQUEST_LOGGER)

    @contextmanager
    def observe(self, call: GenerateCall) -> Iterator[RequestObservation]:
        """Span, metrics and log line around the handling of ``call`` (see the module doc)."""
        observation = RequestObservation(RequestTimeline.start())
        p = call.params
        span = self.tracing.worker_generate(
            model=call.model or self.model_name, request_id=call.request_id, max_tokens=p.max_tokens,
            temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed, n=p.n,
        )
        outcome = ERROR
        with span:
            span.set_worker_id(self.worker_id)
            try:
                yield observation
                outcome = ABORT  # a sequence still open at a normal end was aborted in the engine
            except _CANCELLED:
                outcome = ABORT  # the client went away (or the server stops): the engine aborts
                raise
            finally:
                observation.end(outcome)
                span.set_usage(
                    input_tokens=observation.prompt_tokens, output_tokens=observation.generation_tokens,
                    cached_tokens=observation.cached_tokens, finish_reasons=observation.reasons,
                    device_seconds=observation.device_s, cost=self._cost(observation.device_s),
                )
                span.record_timeline(observation.arrival)
                self._record(call.request_id, observation, span.trace_id, outcome)

    def _record(self, request_id: str, observation: RequestObservation, trace_id: str, outcome: str) -> None:
        first = observation.arrival
        reason = observation.finish_reasons.get(0, outcome)
        if reason in _COUNTED_REASONS and outcome != ERROR:
            itl_s = [gap for _, t in observation.all_timelines() for gap in t.itl_s]
            self.metrics.on_request_finished(
                self.model_name, prompt_tokens=observation.prompt_tokens,
                generation_tokens=observation.generation_tokens, finish_reason=reason,
                ttft_s=first.ttft_s, itl_s=itl_s, e2e_s=first.e2e_s, queue_s=first.queue_s,
            )
        log_request_finished(
            self._log, request_id=request_id, trace_id=trace_id, model=self.model_name,
            worker=self.worker_id, prompt_tokens=observation.prompt_tokens,
            completion_tokens=observation.generation_tokens, cached_tokens=observation.cached_tokens,
            ttft_s=first.ttft_s, e2e_s=first.e2e_s, finish_reason=reason, device_s=observation.device_s,
            cost=self._cost(observation.device_s),
        )

    def _cost(self, device_s: float) -> float | None:
        """The cost of ``device_s`` at the worker's price; None when the price is unknown."""
        return self.metrics.cost_of(device_s) if self.metrics.device_cost_per_hour > 0 else None
