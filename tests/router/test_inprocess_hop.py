"""The router's in-process hop to a worker of its own process (``llmserve up``) against the gRPC hop.

One real worker (tiny llama, real engine, traced) and two real routers on one memory store: one
reaches the worker in-process (``ChannelPool.add_local``, as ``run_stack`` does), the other over
its gRPC port. Each property is checked on both hops: the same greedy tokens; a deadline reaches
the worker (DEADLINE_EXCEEDED, KV blocks freed); a client that goes away aborts the worker's
request; errors keep their status code and details; one trace from the client through the
router to the worker; a worker that gives a stream up mid-way is failed over the same way.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.fleet import MemoryStateStore
from llmserve.grpc_inprocess import InProcessChannel
from llmserve.hashing import block_hashes
from llmserve.telemetry import Tracing, setup_tracing
from llmserve.telemetry import spans as s
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from router.policy import rendezvous
from router.server import RouterConfig, RouterServer
from tests.router.inprocess import worker_idle
from tests.router.router_procs import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "tiny"
HOPS = ("inprocess", "grpc")
GENERATE = "/llmserve.v1.Generation/Generate"
BLOCK = 16


@dataclass
class Stack:
    store: MemoryStateStore
    exporter: InMemorySpanExporter
    client: Tracing
    worker: WorkerServer
    routers: dict[str, RouterServer]  # by hop


async def _worker(model: Path, store: MemoryStateStore, worker_id: str, tracing: Tracing | None = None,
                  drain_grace_s: float = 0.5) -> WorkerServer:
    port = free_port()
    engine = EngineConfig(model=str(model), served_model_name=MODEL, device="cpu", num_kv_blocks=64,
                          max_num_seqs=4, block_size=BLOCK)
    server = ServerConfig(port=port, advertise_address=f"127.0.0.1:{port}", worker_id=worker_id,
                          drain_grace_s=drain_grace_s)
    worker = WorkerServer(engine, server, fleet_store=store, tracing=tracing)
    await worker.start()
    await worker.wait_ready()
    return worker


async def _router(store: MemoryStateStore, local: list[WorkerServer], tracing: Tracing | None = None,
                  ) -> RouterServer:
    router = RouterServer(RouterConfig(port=0, registry_cache_s=0.0), store, tracing=tracing)
    for worker in local:
        router.channels.add_local(worker.service.address, worker.in_process)
    await router.start()
    return router


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(router_tiny_model: Path) -> AsyncIterator[Stack]:
    exporter = InMemorySpanExporter()
    tracings = {n: setup_tracing(n, span_exporter=exporter) for n in ("client", "router", "worker")}
    store = MemoryStateStore()
    worker = await _worker(router_tiny_model, store, "hop-worker", tracings["worker"])
    routers = {"inprocess": await _router(store, [worker], tracings["router"]),
               "grpc": await _router(store, [], tracings["router"])}
    yield Stack(store, exporter, tracings["client"], worker, routers)
    for router in routers.values():
        await router.stop(grace_s=0.5)
    await worker.drain(0.5)
    for tracing in tracings.values():
        tracing.shutdown()


def _request(request_id: str, max_tokens: int, **input: object) -> pb.GenerateRequest:
    if not input:
        input = {"prompt_token_ids": pb.TokenIds(ids=list(range(300, 340)))}
    return pb.GenerateRequest(model=MODEL, request_id=request_id, **input,  # type: ignore[arg-type]
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                         ignore_eos=True))


async def _generate(stack: Stack, hop: str, request: pb.GenerateRequest,
                    timeout_s: float = 60.0) -> list[pb.GenerateResponse]:
    target = stack.routers[hop].target
    async with grpc.aio.insecure_channel(target, interceptors=stack.client.client_interceptors()) as channel:
        return [c async for c in pb_grpc.GenerationStub(channel).Generate(request, timeout=timeout_s)]


async def _wait_kv_free(worker: WorkerServer) -> None:
    """Until no request is in flight and every KV block is free again (bounded)."""
    for _ in range(500):
        if worker_idle(worker):
            return
        await asyncio.sleep(0.01)
    stats = worker.service.engine.stats()
    raise AssertionError(f"still in flight {sorted(worker.service.in_flight)}; KV {stats}")


def _in_flight(worker: WorkerServer, client_id: str) -> bool:
    """Is the request the client called ``client_id`` running on ``worker``? (The router sends a
    client's own id with a random suffix: ``generation.worker_request_id``.)"""
    return any(rid.startswith(f"{client_id}~") for rid in worker.service.in_flight)


def _tokens(chunks: list[pb.GenerateResponse]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def test_same_greedy_tokens_on_both_hops(stack: Stack) -> None:
    by_hop = {hop: await _generate(stack, hop, _request(f"same-{hop}", 12, prompt="the in-process hop"))
              for hop in HOPS}  # a text prompt: each router fetches the tokenizer over its hop
    assert _tokens(by_hop["inprocess"]) == _tokens(by_hop["grpc"]) and len(_tokens(by_hop["grpc"])) == 12
    assert [c.usage.completion_tokens for c in (by_hop[h][-1] for h in HOPS)] == [12, 12]
    assert {by_hop[h][-1].worker_id for h in HOPS} == {"hop-worker"}


async def test_the_hops_differ_only_in_the_peer_the_worker_sees(stack: Stack) -> None:
    """The worker's SERVER span names its caller: loopback TCP for the gRPC hop, none (a local
    ``unix:`` peer) for the in-process one; so the in-process router really skipped the port."""
    for hop in HOPS:
        stack.exporter.clear()
        await _generate(stack, hop, _request(f"peer-{hop}", 2))
        await _wait_kv_free(stack.worker)
        spans = [sp for sp in stack.exporter.get_finished_spans()
                 if sp.resource.attributes["service.name"] == "worker"]
        served = _span(spans, kind=SpanKind.SERVER, name=GENERATE)
        peer = dict(served.attributes or {}).get("net.peer.ip")
        assert peer == ("127.0.0.1" if hop == "grpc" else None), (hop, peer)


@pytest.mark.parametrize("hop", HOPS)
async def test_deadline_gives_deadline_exceeded_and_frees_kv(stack: Stack, hop: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(stack, hop, _request(f"deadline-{hop}", 400), timeout_s=0.4)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _wait_kv_free(stack.worker)


async def test_the_worker_sees_the_callers_deadline_in_process(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """The deadline itself, not a cancel, ends the worker's call: its handler's ``time_remaining``
    ran out (the error interceptor says so) and the caller gets DEADLINE_EXCEEDED."""
    caplog.set_level(logging.INFO, logger="gpu_worker.server.interceptor")
    stub = pb_grpc.GenerationStub(InProcessChannel(stack.worker.in_process))
    call = stub.Generate(_request("deadline-direct", 400), timeout=0.3)
    assert call.time_remaining() is not None and 0 < call.time_remaining() <= 0.3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    await _wait_kv_free(stack.worker)
    assert f"{GENERATE} deadline exceeded" in caplog.messages


@pytest.mark.parametrize("hop", HOPS)
async def test_client_cancel_aborts_the_worker_request(stack: Stack, hop: str) -> None:
    async with grpc.aio.insecure_channel(stack.routers[hop].target) as channel:
        call = pb_grpc.GenerationStub(channel).Generate(_request(f"cancel-{hop}", 400), timeout=60)
        first = await call.read()
        assert first.token_ids
        assert _in_flight(stack.worker, f"cancel-{hop}")
        call.cancel()
    await _wait_kv_free(stack.worker)


async def test_errors_keep_code_and_details_in_process(stack: Stack) -> None:
    bad = pb.GenerateRequest(model=MODEL, prompt_token_ids=pb.TokenIds(ids=[1, 2]),
                             sampling=pb.SamplingParams(top_p=5.0))
    wrong_model = pb.GenerateRequest(model="nope", prompt_token_ids=pb.TokenIds(ids=[1, 2]))
    async with grpc.aio.insecure_channel(stack.worker.target) as channel:
        hops = {"grpc": pb_grpc.GenerationStub(channel),
                "inprocess": pb_grpc.GenerationStub(InProcessChannel(stack.worker.in_process))}
        seen: dict[str, list[tuple[grpc.StatusCode, str]]] = {}
        for hop, stub in hops.items():
            for request in (bad, wrong_model):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.Generate(request, timeout=30):
                        pass
                seen.setdefault(hop, []).append((err.value.code(), err.value.details() or ""))
    assert seen["inprocess"] == seen["grpc"]
    assert [code for code, _ in seen["grpc"]] == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND]


def _span(spans: list[ReadableSpan], **match: object) -> ReadableSpan:
    found = [sp for sp in spans if all(getattr(sp, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [(sp.name, sp.kind) for sp in found])
    return found[0]


async def _spans_when(stack: Stack, wanted: set[tuple[SpanKind, str]]) -> list[ReadableSpan]:
    """The finished spans once every (kind, name) in ``wanted`` is among them (bounded wait): the
    CLIENT span ends in its own task after the call's status arrives, which can trail the stream."""
    for _ in range(500):
        spans = list(stack.exporter.get_finished_spans())
        if wanted <= {(sp.kind, sp.name) for sp in spans}:
            return spans
        await asyncio.sleep(0.01)
    raise AssertionError(f"spans never finished: {[(sp.kind, sp.name) for sp in spans]}")


@pytest.mark.parametrize("hop", HOPS)
async def test_one_trace_from_client_to_worker(stack: Stack, hop: str) -> None:
    stack.exporter.clear()
    await _generate(stack, hop, _request(f"trace-{hop}", 3))
    await _wait_kv_free(stack.worker)
    spans = await _spans_when(stack, {(SpanKind.CLIENT, GENERATE), (SpanKind.SERVER, GENERATE),
                                      (SpanKind.INTERNAL, s.ROUTER_GENERATE_SPAN)})
    routed = _span(spans, name=s.ROUTER_GENERATE_SPAN)
    by_service: dict[str, list[ReadableSpan]] = {}
    for sp in spans:
        by_service.setdefault(str(sp.resource.attributes["service.name"]), []).append(sp)
    assert {sp.context.trace_id for sp in spans} == {routed.context.trace_id}
    call = _span(by_service["router"], kind=SpanKind.CLIENT, name=GENERATE)
    assert call.parent is not None and call.parent.span_id == routed.context.span_id
    served = _span(by_service["worker"], kind=SpanKind.SERVER, name=GENERATE)
    assert served.parent is not None and served.parent.span_id == call.context.span_id
    generated = _span(by_service["worker"], name=s.WORKER_GENERATE_SPAN)
    assert generated.parent is not None and generated.parent.span_id == served.context.span_id
    assert call.status.is_ok and served.status.is_ok


def _prompt_homed_on(worker_id: str, other: str) -> list[int]:
    """Token ids (3 blocks) whose first block's rendezvous home is ``worker_id``."""
    rng = random.Random(7)
    while True:
        ids = [rng.randrange(100, 40000) for _ in range(3 * BLOCK + 5)]
        first = block_hashes(ids, BLOCK, seed=MODEL)[0]
        if rendezvous(first, worker_id) > rendezvous(first, other):
            return ids


@pytest.mark.parametrize("hop", HOPS)
async def test_worker_giving_up_mid_stream_fails_over(router_tiny_model: Path, hop: str) -> None:
    """The local worker drains with a short grace while streaming: its request ends "abort", and
    the router resumes the stream on the other worker (over gRPC); the client sees one unbroken
    stream with the tokens of an uninterrupted run on the other worker."""
    store = MemoryStateStore()
    local = await _worker(router_tiny_model, store, "local", drain_grace_s=0.2)
    other = await _worker(router_tiny_model, store, "other")
    router = await _router(store, [local] if hop == "inprocess" else [])
    ids = _prompt_homed_on("local", "other")
    try:
        async with grpc.aio.insecure_channel(router.target) as channel:
            call = pb_grpc.GenerationStub(channel).Generate(
                _request(f"failover-{hop}", 150, prompt_token_ids=pb.TokenIds(ids=ids)), timeout=60)
            chunks = [await call.read()]
            assert chunks[0].token_ids and _in_flight(local, f"failover-{hop}")
            await local.start_drain(0.001)  # aborts before 150 tokens can be made, however fast
            while (chunk := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                chunks.append(chunk)
        async with grpc.aio.insecure_channel(other.target) as channel:
            reference = [c async for c in pb_grpc.GenerationStub(channel).Generate(
                _request(f"reference-{hop}", 150, prompt_token_ids=pb.TokenIds(ids=ids)), timeout=60)]
    finally:
        await router.stop(grace_s=0.5)
        await local.drain(0.2)
        await other.drain(0.5)
    assert _tokens(chunks) == _tokens(reference) and len(_tokens(chunks)) == 150
    assert chunks[-1].worker_id == "other" and chunks[-1].finish_reason == "length"
    # a stopped worker answers UNAVAILABLE in-process too, as its closed port does: retryable
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in pb_grpc.GenerationStub(InProcessChannel(local.in_process)).Generate(
                _request("after-stop", 2), timeout=5):
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_slow_reader_gets_the_engines_merged_deltas_in_process(stack: Stack) -> None:
    """The in-process hop's flow control: the worker runs one unread message ahead of its
    caller, so while the caller does not read, the engine merges the request's deltas and the
    caller gets few messages with every token, in order, as over gRPC (before, one per step)."""
    channel = InProcessChannel(stack.worker.in_process)
    call = pb_grpc.GenerationStub(channel).Generate(_request("slow-reader", 16), timeout=60.0)
    first = await call.read()
    engine = stack.worker.service.engine
    for _ in range(1000):  # the request runs to its end while nothing is read (bounded)
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
            break
        await asyncio.sleep(0.01)
    rest = [c async for c in call]
    chunks = [first, *rest]
    fast = await _generate(stack, "grpc", _request("fast-reader", 16))
    assert _tokens(chunks) == _tokens(fast) and len(_tokens(chunks)) == 16
    assert len(chunks) <= 3, [len(c.token_ids) for c in chunks]
    assert chunks[-1].usage.completion_tokens == 16
