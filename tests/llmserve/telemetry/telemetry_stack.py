"""A worker-like and a router-like grpc.aio server for the telemetry tests.

Both serve the real ``llmserve.v1.Generation`` service plus gRPC health, and use the telemetry
library exactly as the real servicers should: interceptors from ``Tracing``, the Generate span
helpers, ``RequestTimeline``, ``WorkerMetrics`` / ``RouterMetrics`` and ``log_request_finished``.
The router first tries a worker address where nothing listens, so each request has one retry.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmserve.telemetry import (
    RequestTimeline,
    RouterMetrics,
    Tracing,
    WorkerMetrics,
    log_request_finished,
    setup_tracing,
)
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc

MODEL = "tiny-model"
WORKER_ID = "worker-0"
DEAD_WORKER_ID = "worker-dead"
CACHED_TOKENS = 2
HANG = "hang-"  # request ids with this prefix stall after their first token

worker_log = logging.getLogger("test.worker")
router_log = logging.getLogger("test.router")


class WorkerLike(pb_grpc.GenerationServicer):
    """Generates ``max_tokens`` tokens (ids 0, 1, ...), one chunk per token; finish "length"."""

    def __init__(self, tracing: Tracing, metrics: WorkerMetrics) -> None:
        self.tracing = tracing
        self.metrics = metrics

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        timeline = RequestTimeline.start()
        sampling = request.sampling
        prompt = list(request.prompt_token_ids.ids)
        with self.tracing.worker_generate(
            model=request.model, request_id=request.request_id, max_tokens=sampling.max_tokens,
            temperature=sampling.temperature, seed=sampling.seed if sampling.HasField("seed") else None,
        ) as span:
            span.set_worker_id(WORKER_ID)
            timeline.mark_scheduled()
            for i in range(sampling.max_tokens):
                timeline.mark_tokens(1)
                yield pb.GenerateResponse(request_id=request.request_id, token_ids=[i], text=f"t{i}")
                if request.request_id.startswith(HANG):
                    await asyncio.Event().wait()  # until the client cancels
            timeline.mark_finished()
            span.set_usage(input_tokens=len(prompt), output_tokens=sampling.max_tokens,
                           cached_tokens=CACHED_TOKENS, finish_reasons=["length"])
            span.record_timeline(timeline)
            usage = pb.Usage(prompt_tokens=len(prompt), completion_tokens=sampling.max_tokens,
                             cached_prompt_tokens=CACHED_TOKENS)
            yield pb.GenerateResponse(request_id=request.request_id, finish_reason="length",
                                      usage=usage, worker_id=WORKER_ID)
        self.metrics.on_request_finished(
            request.model, prompt_tokens=len(prompt), generation_tokens=sampling.max_tokens,
            finish_reason="length", ttft_s=timeline.ttft_s, itl_s=timeline.itl_s, e2e_s=timeline.e2e_s,
            queue_s=timeline.queue_s)
        log_request_finished(
            worker_log, request_id=request.request_id, trace_id=span.trace_id, model=request.model,
            worker=WORKER_ID, prompt_tokens=len(prompt), completion_tokens=sampling.max_tokens,
            cached_tokens=CACHED_TOKENS, ttft_s=timeline.ttft_s, e2e_s=timeline.e2e_s, finish_reason="length")


class RouterLike(pb_grpc.GenerationServicer):
    """Routes to a dead worker first (one retry), then forwards the stream of the live one."""

    def __init__(self, tracing: Tracing, metrics: RouterMetrics, worker_addr: str, dead_addr: str) -> None:
        self.tracing = tracing
        self.metrics = metrics
        self.workers = {
            DEAD_WORKER_ID: grpc.aio.insecure_channel(dead_addr, interceptors=tracing.client_interceptors()),
            WORKER_ID: grpc.aio.insecure_channel(worker_addr, interceptors=tracing.client_interceptors()),
        }

    async def close(self) -> None:
        for channel in self.workers.values():
            await channel.close(None)

    async def Generate(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        start = time.monotonic()
        ttft_s: float | None = None
        with self.tracing.router_generate(model=request.model, request_id=request.request_id,
                                          policy="prefix") as span:
            span.add_candidate(DEAD_WORKER_ID, 0.9, 3, load=0.0)
            span.add_candidate(WORKER_ID, 0.5, 1, load=2.0)
            for attempt, worker_id in enumerate((DEAD_WORKER_ID, WORKER_ID), start=1):
                span.set_route(worker_id, "prefix_hit" if attempt == 1 else "load")
                self.metrics.on_routing_decision("prefix", "prefix_hit" if attempt == 1 else "load")
                try:
                    async for chunk in pb_grpc.GenerationStub(self.workers[worker_id]).Generate(request):
                        if ttft_s is None and chunk.token_ids:
                            ttft_s = time.monotonic() - start
                        if chunk.HasField("usage"):
                            span.set_usage(input_tokens=chunk.usage.prompt_tokens,
                                           output_tokens=chunk.usage.completion_tokens,
                                           cached_tokens=chunk.usage.cached_prompt_tokens,
                                           finish_reasons=[chunk.finish_reason])
                        yield chunk
                    break
                except grpc.aio.AioRpcError as exc:
                    span.add_retry(attempt, worker_id, exc.code().name)
                    self.metrics.on_retry(request.model)
        self.metrics.on_request_finished(request.model, "ok", e2e_s=time.monotonic() - start, ttft_s=ttft_s)
        log_request_finished(
            router_log, request_id=request.request_id, trace_id=span.trace_id, model=request.model,
            worker=WORKER_ID, prompt_tokens=0, completion_tokens=0, cached_tokens=0, ttft_s=ttft_s,
            e2e_s=time.monotonic() - start, finish_reason="length")


@dataclass
class Stack:
    """A running router-like and worker-like pair plus the client's tracing."""

    exporter: InMemorySpanExporter
    client_tracing: Tracing
    router_addr: str
    worker_addr: str
    worker_metrics: WorkerMetrics
    router_metrics: RouterMetrics

    def channel(self, addr: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(addr, interceptors=self.client_tracing.client_interceptors())


def _unused_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve(servicer: Any, tracing: Tracing) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=tracing.server_interceptors())
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def start_stack() -> AsyncIterator[Stack]:
    """Start client tracing, worker-like and router-like servers; yield once; stop them."""
    exporter = InMemorySpanExporter()
    tracings = {name: setup_tracing(name, span_exporter=exporter) for name in ("client", "router", "worker")}
    worker_metrics, router_metrics = WorkerMetrics(), RouterMetrics()
    worker, worker_addr = await _serve(WorkerLike(tracings["worker"], worker_metrics), tracings["worker"])
    router_servicer = RouterLike(tracings["router"], router_metrics, worker_addr,
                                 f"127.0.0.1:{_unused_port()}")
    router, router_addr = await _serve(router_servicer, tracings["router"])
    yield Stack(exporter, tracings["client"], router_addr, worker_addr, worker_metrics, router_metrics)
    await router.stop(None)
    await router_servicer.close()
    await worker.stop(None)
    for tracing in tracings.values():
        tracing.shutdown()
