"""Client-side gRPC tracing for grpc.aio channels (imported only when tracing is on).

Why not ``opentelemetry-instrumentation-grpc``'s aio client interceptors: for a server-streaming
call they hand back an async generator whose ``finally`` ends the span, so a call ended with
``call.cancel()`` (the router does it when its client goes away) keeps its span open until the
generator is garbage-collected. Here the span ends when the RPC ends, whatever ends it, and the
caller gets the real call object back. Spans look the same as the instrumentation's (name =
full method, ``rpc.*`` attributes), and the W3C context of the CLIENT span goes into the
outgoing metadata.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, MutableMapping
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.propagators.textmap import Setter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

MethodFilter = Callable[[str], bool]


class _MetadataSetter(Setter[MutableMapping[str, str]]):
    def set(self, carrier: MutableMapping[str, str], key: str, value: str) -> None:
        carrier[key.lower()] = value


_SETTER = _MetadataSetter()


class _ClientTracer:
    """Starts the CLIENT span of a call, injects its context, ends it when the call is done."""

    def __init__(self, tracer: Tracer, traced: MethodFilter) -> None:
        self._tracer = tracer
        self._traced = traced
        self._watchers: set[asyncio.Task[None]] = set()  # strong refs until each call ends

    async def intercept(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
        if not self._traced(method):
            return await continuation(details, request)
        service, _, name = method.lstrip("/").partition("/")
        span = self._tracer.start_span(
            method, kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        carrier: Any = metadata  # a MutableMapping in behaviour; the stubs do not say so
        inject(carrier, context=trace.set_span_in_context(span), setter=_SETTER)
        new_details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        try:
            call = await continuation(new_details, request)
        except BaseException as exc:
            _end(span, grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
            raise
        watcher = asyncio.get_running_loop().create_task(self._end_when_done(span, call))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return call

    @staticmethod
    async def _end_when_done(span: Span, call: Any) -> None:
        try:
            code = await call.code()
            details = await call.details() if code != grpc.StatusCode.OK else ""
        except BaseException:  # the loop is closing: still end the span
            span.end()
            raise
        _end(span, code, details)


def _end(span: Span, code: grpc.StatusCode, details: str) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))
    span.end()


class UnaryUnaryTracingInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """CLIENT span for unary calls."""

    def __init__(self, client_tracer: _ClientTracer) -> None:
        self._client_tracer = client_tracer

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._client_tracer.intercept(continuation, client_call_details, request)


class UnaryStreamTracingInterceptor(grpc.aio.UnaryStreamClientInterceptor):
    """CLIENT span for server-streaming calls (Generate)."""

    def __init__(self, client_tracer: _ClientTracer) -> None:
        self._client_tracer = client_tracer

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._client_tracer.intercept(continuation, client_call_details, request)


def client_interceptors(tracer: Tracer, traced: MethodFilter) -> list[Any]:
    """Interceptors for unary and server-streaming calls (all our services use); calls with a
    streaming request pass through untraced."""
    shared = _ClientTracer(tracer, traced)
    return [UnaryUnaryTracingInterceptor(shared), UnaryStreamTracingInterceptor(shared)]
