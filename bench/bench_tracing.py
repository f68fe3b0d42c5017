"""Cost of tracing: client -> router -> worker over loopback gRPC, tracing off vs on.

The worker is a fake that streams ``--tokens`` tokens per request without a model, so the
numbers are the serving stack's own overhead, where tracing's share is largest. Both servers use
``llmserve.telemetry`` as the real ones do (interceptors, Generate spans, RequestTimeline,
metrics). Each mode runs in its own interpreter (tracing off must not even import
OpenTelemetry):

- ``off``: no ``OTEL_*`` exporter;
- ``on``: every span recorded and handed to an exporter that drops it (SDK cost, no network);
- ``otlp``: the ``OTEL_*`` environment as given (run a collector, e.g. the Compose stack).

``python bench/bench_tracing.py [--modes off,on] [--requests 400] [--concurrency 8] [--tokens 32]
[--json PATH]``; prints a table last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from llmserve.telemetry import RequestTimeline, RouterMetrics, Tracing, WorkerMetrics, setup_tracing
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc

MODEL = "bench-model"


class FakeWorker(pb_grpc.GenerationServicer):
    def __init__(self, tracing: Tracing, metrics: WorkerMetrics) -> None:
        self.tracing, self.metrics = tracing, metrics

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        timeline = RequestTimeline.start()
        n = request.sampling.max_tokens
        with self.tracing.worker_generate(model=request.model, request_id=request.request_id, max_tokens=n,
                                          temperature=request.sampling.temperature) as span:
            span.set_worker_id("w0")
            timeline.mark_scheduled()
            for i in range(n):
                await asyncio.sleep(0)  # an engine step
                timeline.mark_tokens(1)
                yield pb.GenerateResponse(request_id=request.request_id, token_ids=[i], text="x")
            timeline.mark_finished()
            span.set_usage(input_tokens=8, output_tokens=n, finish_reasons=["length"])
            span.record_timeline(timeline)
            yield pb.GenerateResponse(request_id=request.request_id, finish_reason="length", worker_id="w0",
                                      usage=pb.Usage(prompt_tokens=8, completion_tokens=n))
        self.metrics.on_request_finished(request.model, prompt_tokens=8, generation_tokens=n,
                                         finish_reason="length", ttft_s=timeline.ttft_s, itl_s=timeline.itl_s,
                                         e2e_s=timeline.e2e_s, queue_s=timeline.queue_s)


class ForwardingRouter(pb_grpc.GenerationServicer):
    def __init__(self, tracing: Tracing, metrics: RouterMetrics, channel: grpc.aio.Channel) -> None:
        self.tracing, self.metrics = tracing, metrics
        self.stub = pb_grpc.GenerationStub(channel)

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        start = time.monotonic()
        with self.tracing.router_generate(model=request.model, request_id=request.request_id,
                                          policy="prefix") as span:
            span.add_candidate("w0", 1.0, 4, load=1.0)
            span.set_route("w0", "prefix_hit")
            self.metrics.on_routing_decision("prefix", "prefix_hit")
            async for chunk in self.stub.Generate(request):
                yield chunk
            span.set_usage(input_tokens=8, output_tokens=request.sampling.max_tokens,
                           finish_reasons=["length"])
        self.metrics.on_request_finished(request.model, "ok", e2e_s=time.monotonic() - start)


class _DropExporter:
    """A SpanExporter that drops spans (duck-typed: the SDK calls these three methods)."""

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def _tracing(mode: str, name: str) -> Tracing:
    if mode == "on":
        return setup_tracing(name, span_exporter=_DropExporter())  # type: ignore[arg-type]
    return setup_tracing(name)


async def _serve(servicer: Any, tracing: Tracing) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=tracing.server_interceptors())
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _run(mode: str, requests: int, concurrency: int, tokens: int) -> dict[str, Any]:
    if mode == "off":
        os.environ["OTEL_TRACES_EXPORTER"] = "none"
    tw, tr, tc = (_tracing(mode, name) for name in ("llmserve-worker", "llmserve-router", "client"))
    worker, worker_addr = await _serve(FakeWorker(tw, WorkerMetrics()), tw)
    to_worker = grpc.aio.insecure_channel(worker_addr, interceptors=tr.client_interceptors())
    router, router_addr = await _serve(ForwardingRouter(tr, RouterMetrics(), to_worker), tr)
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(router_addr, interceptors=tc.client_interceptors()) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one(i: int) -> None:
            req = pb.GenerateRequest(model=MODEL, request_id=f"r{i}", prompt="hi",
                                     sampling=pb.SamplingParams(max_tokens=tokens, temperature=0.0))
            t0 = time.perf_counter()
            async for _ in stub.Generate(req):
                pass
            latencies.append(time.perf_counter() - t0)

        async def client(ids: range) -> None:
            for i in ids:
                await one(i)

        await asyncio.gather(*(client(range(c, 2 * concurrency, concurrency)) for c in range(concurrency)))
        latencies.clear()  # warm-up done
        t0 = time.perf_counter()
        await asyncio.gather(*(client(range(c, requests, concurrency)) for c in range(concurrency)))
        wall = time.perf_counter() - t0
    await router.stop(None)
    await to_worker.close(None)
    await worker.stop(None)
    for t in (tc, tr, tw):
        t.shutdown()
    ms = sorted(x * 1e3 for x in latencies)
    return {
        "mode": mode, "tracing": tw.enabled, "requests": len(ms), "concurrency": concurrency,
        "tokens": tokens, "req_per_s": len(ms) / wall, "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
        "otel_imported": any(m.startswith("opentelemetry") for m in sys.modules),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="off,on", help="comma list of off, on, otlp")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_run(args.child, args.requests, args.concurrency, args.tokens))))
        return
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode, "--requests", str(args.requests),
               "--concurrency", str(args.concurrency), "--tokens", str(args.tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    base = rows[0]["req_per_s"]
    print(f"{'mode':<6} {'otel':>5} {'req/s':>9} {'vs first':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(f"{r['mode']:<6} {str(r['otel_imported']):>5} {r['req_per_s']:>9.1f} "
              f"{r['req_per_s'] / base:>8.1%} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")
    print(f"({rows[0]['requests']} requests, concurrency {args.concurrency}, {args.tokens} tokens each)")


if __name__ == "__main__":
    main()
