"""Observability of a real router in front of a real worker (in-process, tiny llama, memory store).

One trace per request shared by the client's CLIENT span, the router's ``llmserve.router.generate``
(candidates, chosen worker, retries, usage) and the worker's spans; ``/metrics`` counts exactly
what was sent; one ``request finished`` log line per request; SIGTERM-style drain lets a relayed
stream finish while new calls are refused.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.fleet import LoadReport, MemoryStateStore, WorkerRecord
from llmserve.hashing import block_hashes
from llmserve.telemetry import Tracing, setup_tracing
from llmserve.telemetry import spans as s
from llmserve.telemetry.logging import FIELDS_ATTR
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from router.policy import rendezvous
from router.request_telemetry import REQUEST_LOGGER
from router.server import RouterConfig, RouterServer
from tests.router.router_procs import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "tiny"
WORKER_ID = "obs-worker"
DEAD_ID = "obs-dead"  # registered, but nothing listens at its address
BLOCK = 16


@dataclass
class Observed:
    store: MemoryStateStore
    exporter: InMemorySpanExporter
    client: Tracing
    router_tracing: Tracing
    worker: WorkerServer


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def observed(router_tiny_model: Path) -> AsyncIterator[Observed]:
    exporter = InMemorySpanExporter()
    tracings = {n: setup_tracing(n, span_exporter=exporter) for n in ("client", "router", "worker")}
    store = MemoryStateStore()
    port = free_port()
    engine = EngineConfig(model=str(router_tiny_model), served_model_name=MODEL, device="cpu",
                          num_kv_blocks=64, max_num_seqs=4, block_size=BLOCK)
    server = ServerConfig(port=port, advertise_address=f"127.0.0.1:{port}", worker_id=WORKER_ID,
                          drain_grace_s=0.5)
    worker = WorkerServer(engine, server, fleet_store=store, tracing=tracings["worker"])
    await worker.start()
    await worker.wait_ready()
    yield Observed(store, exporter, tracings["client"], tracings["router"], worker)
    await worker.drain(0.5)
    for tracing in tracings.values():
        tracing.shutdown()


async def _router(observed: Observed, **config: object) -> RouterServer:
    router = RouterServer(RouterConfig(port=0, registry_cache_s=0.05, **config), observed.store,  # type: ignore[arg-type]
                          tracing=observed.router_tracing)
    await router.start()
    return router


async def _register_dead_worker(store: MemoryStateStore) -> None:
    dead = WorkerRecord(DEAD_ID, MODEL, f"127.0.0.1:{free_port()}", BLOCK, 1024,
                        LoadReport(max_num_seqs=4, max_queue_len=4), heartbeat_at=time.time())
    await store.heartbeat(dead, ttl_s=600)


def _prompt_homed_on(worker_id: str, other: str, rng: random.Random) -> list[int]:
    """Fresh token ids (3 blocks) whose first block's rendezvous home is ``worker_id``."""
    while True:
        ids = [rng.randrange(100, 40000) for _ in range(3 * BLOCK + 5)]
        first = block_hashes(ids, BLOCK, seed=MODEL)[0]
        if rendezvous(first, worker_id) > rendezvous(first, other):
            return ids


async def _wait_cached(store: MemoryStateStore, worker_id: str, ids: list[int]) -> None:
    """Until the store holds every full prompt block of ``ids`` for ``worker_id`` (bounded)."""
    chain = block_hashes(ids, BLOCK, seed=MODEL)
    for _ in range(1000):
        if (await store.match_prefixes({worker_id: chain}))[worker_id] == len(chain):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{worker_id} never published the {len(chain)} blocks of the prompt")


async def _generate(
    observed: Observed, target: str, request: pb.GenerateRequest
) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(target, interceptors=observed.client.client_interceptors()) as ch:
        return [c async for c in pb_grpc.GenerationStub(ch).Generate(request, timeout=60)]


def _attrs(item: Any) -> dict[str, Any]:
    """A span's or event's attributes as a plain dict."""
    return dict(item.attributes or {})


def _spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [sp for sp in exporter.get_finished_spans() if sp.name == name]


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for family in text_string_to_metric_families(text) for smp in family.samples}


def _request(ids: list[int], request_id: str, max_tokens: int = 4) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=MODEL, request_id=request_id, prompt_token_ids=pb.TokenIds(ids=ids),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                         ignore_eos=True))


async def test_one_trace_from_client_through_router_to_worker(
    observed: Observed, caplog: pytest.LogCaptureFixture
) -> None:
    await _register_dead_worker(observed.store)
    router = await _router(observed)
    observed.exporter.clear()
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    ids = _prompt_homed_on(DEAD_ID, WORKER_ID, random.Random(1))  # the dead worker ranks first
    try:
        chunks = await _generate(observed, router.target, _request(ids, "trace-1"))
        assert chunks[-1].worker_id == WORKER_ID
        await _wait_cached(observed.store, WORKER_ID, ids)  # the first request's KV events
        chunks = await _generate(observed, router.target, _request(ids, "trace-2"))
        assert chunks[-1].usage.cached_prompt_tokens >= 2 * BLOCK
    finally:
        await router.stop(grace_s=1)
    spans = observed.exporter.get_finished_spans()
    routed = _spans(observed.exporter, s.ROUTER_GENERATE_SPAN)
    route = {_attrs(sp)[s.LLMSERVE_REQUEST_ID]: sp for sp in routed}
    assert set(route) == {"trace-1", "trace-2"}
    for rid, span in route.items():
        client = next(sp for sp in spans if sp.kind == SpanKind.CLIENT and sp.parent is None
                      and sp.context.trace_id == span.context.trace_id)
        assert client.name == "/llmserve.v1.Generation/Generate"
        worker = [sp for sp in _spans(observed.exporter, s.WORKER_GENERATE_SPAN)  # the client's id + suffix
                  if _attrs(sp)[s.LLMSERVE_REQUEST_ID].startswith(f"{rid}~")]
        assert len(worker) == 1 and worker[0].context.trace_id == span.context.trace_id
        calls = [sp for sp in spans if sp.kind == SpanKind.CLIENT and sp.parent is not None
                 and sp.parent.span_id == span.context.span_id]
        retried = rid == "trace-1"  # the dead worker is the home; trace-2 follows the cached prefix
        assert len(calls) == 1 + retried and sum(not sp.status.is_ok for sp in calls) == retried
        a = _attrs(span)
        assert a[s.GEN_AI_REQUEST_MODEL] == MODEL and a[s.LLMSERVE_ROUTE_POLICY] == "prefix"
        assert a[s.LLMSERVE_ROUTE_WORKER_ID] == WORKER_ID
        assert a[s.LLMSERVE_ROUTE_REASON] == ("retry" if retried else "prefix_hit")
        assert a[s.LLMSERVE_ROUTE_NUM_CANDIDATES] == 2 and a.get(s.LLMSERVE_ROUTE_NUM_RETRIES, 0) == retried
        assert a[s.GEN_AI_USAGE_INPUT_TOKENS] == len(ids) and a[s.GEN_AI_USAGE_OUTPUT_TOKENS] == 4
        assert list(a[s.GEN_AI_RESPONSE_FINISH_REASONS]) == ["length"]
        candidates = {_attrs(e)[s.LLMSERVE_WORKER_ID]: _attrs(e) for e in span.events
                      if e.name == s.EVENT_ROUTE_CANDIDATE}
        assert set(candidates) == {DEAD_ID, WORKER_ID}
        assert all(isinstance(c[s.LLMSERVE_ROUTE_SCORE], float) for c in candidates.values())
        retries = [_attrs(e)[s.LLMSERVE_WORKER_ID] for e in span.events if e.name == s.EVENT_RETRY]
        assert retries == ([DEAD_ID] if retried else [])
    assert _attrs(route["trace-1"])[s.LLMSERVE_USAGE_CACHED_TOKENS] == 0
    second = {_attrs(e)[s.LLMSERVE_WORKER_ID]: _attrs(e) for e in route["trace-2"].events
              if e.name == s.EVENT_ROUTE_CANDIDATE}
    assert second[WORKER_ID][s.LLMSERVE_ROUTE_MATCHED_PREFIX_BLOCKS] == 3
    lines = [getattr(r, FIELDS_ATTR) for r in caplog.records if r.name == REQUEST_LOGGER]
    assert [(f["request_id"], f["trace_id"], f["worker"]) for f in lines] == [
        (rid, format(route[rid].context.trace_id, "032x"), WORKER_ID) for rid in ("trace-1", "trace-2")]
    assert lines[0]["prompt_tokens"] == len(ids) and lines[0]["completion_tokens"] == 4
    await observed.store.remove_worker(DEAD_ID)


async def test_metrics_count_what_was_sent(observed: Observed) -> None:
    router = await _router(observed, metrics_port=0)
    rng = random.Random(2)
    sent = 5
    try:
        for i in range(sent):
            ids = _prompt_homed_on(WORKER_ID, DEAD_ID, rng)
            await _generate(observed, router.target, _request(ids, f"m{i}"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _generate(observed, router.target, pb.GenerateRequest(model="nope", prompt="hi"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert router.metrics_port is not None
        m = _scrape(router.metrics_port)
    finally:
        await router.stop(grace_s=1)
    p = "llmserve:router_"
    assert m[(p + "requests_total", (("model", MODEL), ("outcome", "ok")))] == sent
    assert m[(p + "requests_total", (("model", "unknown"), ("outcome", "not_found")))] == 1
    decisions = sum(v for (name, labels), v in m.items() if name == p + "routing_decisions_total"
                    and ("policy", "prefix") in labels)
    assert decisions == sent
    assert m[(p + "time_to_first_token_seconds_count", (("model", MODEL),))] == sent
    assert m[(p + "request_latency_seconds_count", (("model", MODEL),))] == sent
    assert m[(p + "live_workers", (("model", MODEL),))] == 1
    assert (p + "worker_load", (("model", MODEL), ("worker_id", WORKER_ID))) in m
    assert not any(name == p + "retries_total" and v for (name, _), v in m.items())


async def test_drain_lets_a_relayed_stream_finish_and_refuses_new_calls(observed: Observed) -> None:
    router = await _router(observed, drain_grace_s=20)
    ids = _prompt_homed_on(WORKER_ID, DEAD_ID, random.Random(3))
    async with grpc.aio.insecure_channel(router.target) as ch:
        stream = pb_grpc.GenerationStub(ch).Generate(_request(ids, "drain-1", max_tokens=48), timeout=60)
        first = await stream.read()
        assert isinstance(first, pb.GenerateResponse)
        stopping = asyncio.create_task(router.stop())
        await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.GenerationStub(ch).Generate(_request(ids, "drain-2"), timeout=5).read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rest: list[Any] = []
        while (chunk := await stream.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            rest.append(chunk)
    await asyncio.wait_for(stopping, timeout=30)
    assert rest[-1].finish_reason == "length"
    assert sum(len(c.token_ids) for c in [first, *rest]) == 48
