"""OpenTelemetry tracing for router and worker, configured by the standard ``OTEL_*`` variables.

Entry points call :func:`setup_tracing` once and hand the :class:`Tracing` object to the gRPC
server (``server_interceptors()``), to the channels they open (``client_interceptors()``) and
to the servicers (``router_generate(...)`` / ``worker_generate(...)``). Nothing here is global:
each ``Tracing`` owns its ``TracerProvider`` (tests run a router and a worker in one process,
each with its own), and only the W3C propagator is the process-wide default of OpenTelemetry.

Tracing off (``OTEL_TRACES_EXPORTER`` unset or ``none``, or ``OTEL_SDK_DISABLED=true``) imports
no OpenTelemetry module at all: no interceptors, and the spans are stateless no-ops. The GPU
images ship without OpenTelemetry; asking for tracing there logs an error and runs untraced.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmserve.telemetry.spans import (
    GEN_AI_REQUEST_CHOICE_COUNT,
    GEN_AI_REQUEST_MAX_TOKENS,
    GEN_AI_REQUEST_SEED,
    GEN_AI_REQUEST_TEMPERATURE,
    GEN_AI_REQUEST_TOP_K,
    GEN_AI_REQUEST_TOP_P,
    NOOP_HTTP_SERVER_SPAN,
    NOOP_ROUTER_SPAN,
    NOOP_WORKER_SPAN,
    HttpServerSpan,
    RouterGenerateSpan,
    WorkerGenerateSpan,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

logger = logging.getLogger(__name__)

EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("grpc", "http/protobuf")
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")
"""gRPC services whose calls get no span, server or client side (prefix match)."""


@dataclass(frozen=True)
class TracingConfig:
    """What the ``OTEL_*`` variables ask for. The SDK itself reads the rest (endpoint, headers,
    ``OTEL_TRACES_SAMPLER`` / ``_ARG``, ``OTEL_BSP_*``, ``OTEL_RESOURCE_ATTRIBUTES``)."""

    service_name: str
    exporters: tuple[str, ...] = ()
    protocol: str = "grpc"

    def __post_init__(self) -> None:
        unknown = [e for e in self.exporters if e not in EXPORTERS]
        if unknown:
            raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter(s) {unknown}; use {EXPORTERS}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported {self.protocol!r}; use {PROTOCOLS}")

    @property
    def enabled(self) -> bool:
        return bool(self.exporters)

    @classmethod
    def from_env(cls, service_name: str, environ: Mapping[str, str] | None = None) -> TracingConfig:
        """Read ``OTEL_SDK_DISABLED``, ``OTEL_TRACES_EXPORTER`` (comma list of otlp|console|none,
        default none), ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``
        (grpc | http/protobuf, default grpc) and ``OTEL_SERVICE_NAME`` (overrides ``service_name``)."""
        env = os.environ if environ is None else environ
        name = env.get("OTEL_SERVICE_NAME", "").strip() or service_name
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
        ).strip()
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls(service_name=name, protocol=protocol)
        raw = env.get("OTEL_TRACES_EXPORTER", "none")
        exporters = tuple(e.strip().lower() for e in raw.split(",") if e.strip())
        if "none" in exporters:
            exporters = ()  # the spec: "none" means no automatically configured exporter
        return cls(service_name=name, exporters=exporters, protocol=protocol)


class Tracing:
    """Tracing of one service. Disabled unless built with a ``TracerProvider``.

    Use :func:`setup_tracing` rather than the constructor.
    """

    def __init__(self, service_name: str, provider: TracerProvider | None = None) -> None:
        self.service_name = service_name
        self._provider = provider
        self._tracer: Any = None
        if provider is not None:
            self._tracer = provider.get_tracer("llmserve")

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    @property
    def tracer_provider(self) -> TracerProvider | None:
        """The SDK provider (None when disabled), e.g. for other instrumentations."""
        return self._provider

    def server_interceptors(self) -> list[Any]:
        """Interceptors for ``grpc.aio.server(interceptors=...)``: continue the caller's trace
        from the W3C ``traceparent`` metadata and open a SERVER span per call, except for the
        health and reflection services. Empty when disabled. Servicer methods that stream
        must be async generators (not ``context.write``)."""
        if self._provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(tracer_provider=self._provider, filter_=_traced_calls_filter())]

    def client_interceptors(self) -> list[Any]:
        """Interceptors for ``grpc.aio.insecure_channel(addr, interceptors=...)``: a CLIENT span
        per unary or server-streaming call (not health/reflection), ended when the call ends
        (cancel included), its W3C context injected into the outgoing metadata. Open the call
        inside the ``router_generate`` block so that the span is its child. Empty when disabled."""
        if self._provider is None:
            return []
        from llmserve.telemetry._grpc_client import client_interceptors

        return list(client_interceptors(self._provider.get_tracer("llmserve.grpc"), is_traced_method))

    def http_server(self, *, method: str, route: str, headers: Mapping[str, str]) -> HttpServerSpan:
        """The SERVER span of one HTTP request, a child of the W3C context in ``headers``
        (``traceparent``, ``tracestate``; a new trace without them). Use it as a context manager
        around the whole handling, so the spans made inside become its children."""
        if self._tracer is None:
            return NOOP_HTTP_SERVER_SPAN
        from llmserve.telemetry._otel_spans import OtelHttpServerSpan

        return OtelHttpServerSpan(self._tracer, method=method, route=route, headers=headers)

    def router_generate(
        self, *, model: str, request_id: str, policy: str, operation: str = "text_completion"
    ) -> RouterGenerateSpan:
        """The router's Generate span; use it as a context manager (see ``spans``)."""
        if self._tracer is None:
            return NOOP_ROUTER_SPAN
        from llmserve.telemetry._otel_spans import OtelRouterGenerateSpan

        return OtelRouterGenerateSpan(
            self._tracer, model=model, request_id=request_id, policy=policy, operation=operation
        )

    def worker_generate(
        self,
        *,
        model: str,
        request_id: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        n: int | None = None,
        operation: str = "text_completion",
    ) -> WorkerGenerateSpan:
        """The worker's Generate span with the request's sampling parameters (None = not set)."""
        if self._tracer is None:
            return NOOP_WORKER_SPAN
        from llmserve.telemetry._otel_spans import OtelWorkerGenerateSpan

        request_attributes = {
            GEN_AI_REQUEST_MAX_TOKENS: max_tokens,
            GEN_AI_REQUEST_TEMPERATURE: temperature,
            GEN_AI_REQUEST_TOP_P: top_p,
            GEN_AI_REQUEST_TOP_K: top_k,
            GEN_AI_REQUEST_SEED: seed,
            GEN_AI_REQUEST_CHOICE_COUNT: n,
        }
        return OtelWorkerGenerateSpan(
            self._tracer, model=model, request_id=request_id, operation=operation,
            request_attributes=request_attributes,
        )

    def current_trace_id(self) -> str:
        """Trace id (32 hex digits) of the current span, "" when none or disabled."""
        if self._provider is None:
            return ""
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        return format(ctx.trace_id, "032x") if ctx.is_valid else ""

    def force_flush(self, timeout_ms: int = 30_000) -> bool:
        """Export the spans still buffered; True when done in time (or disabled)."""
        return True if self._provider is None else bool(self._provider.force_flush(timeout_ms))

    def shutdown(self) -> None:
        """Flush and stop the exporters; call once when the server stops."""
        if self._provider is not None:
            self._provider.shutdown()


def setup_tracing(service_name: str, *, span_exporter: SpanExporter | None = None) -> Tracing:
    """Build this service's tracing from the ``OTEL_*`` environment (see ``TracingConfig``).

    ``span_exporter`` (tests, benchmarks) turns tracing on with that exporter behind a
    synchronous processor, whatever the environment says about exporters.
    """
    config = TracingConfig.from_env(service_name)
    if span_exporter is None and not config.enabled:
        return Tracing(config.service_name)
    try:
        provider = _build_provider(config, span_exporter)
    except ImportError as exc:
        logger.error("tracing requested (%s) but OpenTelemetry is not installed: %s; running untraced",
                     ",".join(config.exporters), exc)
        return Tracing(config.service_name)
    return Tracing(config.service_name, provider)


def _build_provider(config: TracingConfig, span_exporter: SpanExporter | None) -> TracerProvider:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES; the sampler comes from OTEL_TRACES_SAMPLER.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: config.service_name}))
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        return provider
    for name in config.exporters:
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        else:
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(config.protocol)))
    return provider


def _otlp_exporter(protocol: str) -> SpanExporter:
    """OTLP exporter; it reads ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, headers, timeout itself."""
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter()


def is_traced_method(method: str) -> bool:
    """True for a full gRPC method name ("/pkg.Service/Method") outside UNTRACED_SERVICES."""
    return not method.lstrip("/").startswith(UNTRACED_SERVICES)


def _traced_calls_filter() -> Any:
    """Filter for the gRPC instrumentation: True for calls to trace (all but UNTRACED_SERVICES)."""
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(*(filters.service_prefix(p) for p in UNTRACED_SERVICES)))
