"""The gRPC ports' limits as the router and the worker apply them (``llmserve.grpc_limits``): a
real worker (tiny model) and a real router in this event loop over a real Redis. On the router:
a call past ``--max-concurrent-rpcs`` is refused at once naming it and counted while probes
still answer, a Generate whose stream ends without its request is answered, a KServe stream
serves its requests within ``--max-kserve-stream-requests`` and is cut when its client stops
reading (``--grpc-write-timeout-s``: the worker freed, the status DEADLINE_EXCEEDED), and a
connection that never handshakes is closed. On the worker: the same handshake deadline, its own
``--max-concurrent-rpcs`` against calls whose request never comes, and those calls ended by
``--grpc-request-timeout-s``. Served in full again once the held calls go.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import tritonclient.grpc.aio as grpcclient_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpu_worker.server import WorkerServer
from llmserve.fleet.redis_store import RedisStateStore
from llmserve.grpc_limits import GrpcPortLimits
from llmserve.kserve import grpc_service_pb2 as kserve_pb
from llmserve.kserve import grpc_service_pb2_grpc as kserve_grpc
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from router.request_telemetry import UNKNOWN_MODEL
from router.server import RouterServer
from tests.helpers.stalled_clients import half_open, silent_connection_closed
from tests.router.frontends.kserve_inputs import is_final, text_inputs
from tests.router.inprocess import start_router, start_worker, worker_idle
from tests.router.router_procs import RedisProc

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "kilo"
WORKER_CALLS = 3
GENERATE = "/llmserve.v1.Generation/Generate"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers(module_redis: RedisProc, router_tiny_model: Path) -> AsyncIterator[tuple[WorkerServer,
                                                                                           RouterServer]]:
    store = RedisStateStore(module_redis.url)
    worker = await start_worker(router_tiny_model, MODEL, module_redis.url,
                                grpc_limits=GrpcPortLimits(handshake_timeout_s=0.3, max_connection_idle_s=0,
                                                           request_timeout_s=3.0),
                                max_concurrent_rpcs=WORKER_CALLS)
    router = await start_router(store, max_concurrent_rpcs=1, metrics_port=None, max_kserve_stream_requests=1,
                                grpc_limits=GrpcPortLimits(handshake_timeout_s=0.3))
    try:
        yield worker, router
    finally:
        await router.stop(grace_s=0.5)
        await worker.drain(0.5)
        await store.close()


def request() -> gen_pb.GenerateRequest:
    return gen_pb.GenerateRequest(model=MODEL, prompt_token_ids=gen_pb.TokenIds(ids=[1, 2, 3]),
                                  sampling=gen_pb.SamplingParams(max_tokens=2, temperature=0.0))


async def settled(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while not condition():
            await asyncio.sleep(0.02)


async def tokens(target: str) -> list[int]:
    async with grpc.aio.insecure_channel(target) as channel:
        chunks = [c async for c in gen_grpc.GenerationStub(channel).Generate(request(), timeout=60)]
    return [t for c in chunks for t in c.token_ids]


async def test_the_router_refuses_calls_past_its_limit_naming_it(servers: tuple[WorkerServer, RouterServer]
                                                               ) -> None:
    _, router = servers
    assert len(await tokens(router.target)) == 2
    await settled(lambda: router.calls_in_flight == 0)  # that call's task has ended
    async with grpc.aio.insecure_channel(router.target) as channel:
        held = half_open(channel, GENERATE)
        await settled(lambda: router.calls_in_flight == 1)  # its headers reached the router
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in gen_grpc.GenerationStub(channel).Generate(request(), timeout=30):
                pass
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit is 1 (max_concurrent_rpcs, flag --max-concurrent-rpcs)" in (info.value.details() or "")
        refusals = router.metrics.registry.get_sample_value(
            "llmserve:router_refusals_total", {"model": UNKNOWN_MODEL, "limit": "max_concurrent_rpcs"})
        assert refusals == 1
        # probes are never refused for load: gRPC health and KServe's liveness / readiness
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        live = await kserve_grpc.GRPCInferenceServiceStub(channel).ServerLive(
            kserve_pb.ServerLiveRequest(), timeout=5)
        assert live.live
        held.cancel()
        await settled(lambda: router.calls_in_flight == 0)
    assert len(await tokens(router.target)) == 2  # the held call's place is free again


async def test_both_ports_close_a_connection_that_never_handshakes(servers: tuple[WorkerServer, RouterServer]
                                                                 ) -> None:
    worker, router = servers
    assert await silent_connection_closed(router.port)
    assert await silent_connection_closed(worker.port)


async def test_the_router_answers_a_generate_ended_without_its_request(
        servers: tuple[WorkerServer, RouterServer]) -> None:
    _, router = servers
    async with grpc.aio.insecure_channel(router.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async with asyncio.timeout(5):  # grpc.aio alone never answers it
                async for _ in channel.stream_stream(GENERATE)(iter(())):
                    pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await settled(lambda: router.calls_in_flight == 0)


async def test_the_worker_bounds_calls_whose_request_never_comes(servers: tuple[WorkerServer, RouterServer]
                                                               ) -> None:
    worker, router = servers
    await settled(lambda: worker.calls_in_flight == 0)
    async with grpc.aio.insecure_channel(worker.target) as channel:
        held = [half_open(channel, GENERATE) for _ in range(WORKER_CALLS)]
        await settled(lambda: worker.calls_in_flight == WORKER_CALLS)  # their headers reached the worker
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async with asyncio.timeout(5):
                async for _ in half_open(channel, GENERATE):
                    pass
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = refused.value.details() or ""
        assert "limit is 3 (max_concurrent_rpcs, flag --max-concurrent-rpcs)" in details
        # through the router: busy, in the worker's own words
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await tokens(router.target)
        assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tried is busy" in (busy.value.details() or "")
        assert "flag --max-concurrent-rpcs" in (busy.value.details() or "")
        for call in held:  # each ended by the worker's request timeout
            with pytest.raises(grpc.aio.AioRpcError) as late:
                async with asyncio.timeout(10):
                    async for _ in call:
                        pass
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def refusals(limit: str) -> float | None:
        return worker.engine_metrics.metrics.registry.get_sample_value(
            "llmserve:request_refusals_total", {"model_name": MODEL, "limit": limit})

    assert (refusals("max_concurrent_rpcs"), refusals("grpc_request_timeout_s")) == (2, WORKER_CALLS)
    assert len(await tokens(router.target)) == 2  # through the router, on the freed worker


async def test_a_kserve_stream_serves_its_requests_within_its_bound(servers: tuple[WorkerServer, RouterServer]
                                                                  ) -> None:
    """With ``--max-kserve-stream-requests 1`` a stream's requests run one at a time: they finish
    in the order sent, although the second is much shorter than the first."""
    _, router = servers
    await settled(lambda: router.calls_in_flight == 0)
    client = grpcclient_aio.InferenceServerClient(router.target)
    lengths = [8, 1, 1]

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for i, max_tokens in enumerate(lengths):
            sampling = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            yield {"model_name": MODEL, "request_id": f"k-{i}",
                   "inputs": text_inputs("Hello there", stream=False, sampling=sampling)}

    finals: list[str] = []
    try:
        async with asyncio.timeout(60):
            async for result, error in client.stream_infer(requests()):
                assert error is None, error
                if is_final(result):
                    finals.append(result.get_response().id)
                if len(finals) == len(lengths):
                    break
    finally:
        await client.close()
    assert finals == ["k-0", "k-1", "k-2"]


def streamed_request(i: int, max_tokens: int) -> kserve_pb.ModelInferRequest:
    """A raw KServe v2 request for ``max_tokens`` streamed tokens (one response each)."""
    def tensor(name: str, datatype: str) -> kserve_pb.ModelInferRequest.InferInputTensor:
        return kserve_pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=[1])

    sampling = json.dumps({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()
    return kserve_pb.ModelInferRequest(
        model_name=MODEL, id=f"s-{i}",
        inputs=[tensor("text_input", "BYTES"), tensor("stream", "BOOL"),
                tensor("sampling_parameters", "BYTES")],
        raw_input_contents=[struct.pack("<I", 5) + b"Hello", b"\x01",
                            struct.pack("<I", len(sampling)) + sampling])


async def test_a_kserve_stream_whose_client_stopped_reading_is_cut(
        servers: tuple[WorkerServer, RouterServer], module_redis: RedisProc) -> None:
    """A client that keeps sending requests on one ModelStreamInfer stream but reads nothing:
    once flow control holds a response past ``--grpc-write-timeout-s`` the stream is ended (the
    call leaves the count, its requests leave the worker, every KV block is free) without
    waiting for the client, which gets what was in flight, then DEADLINE_EXCEEDED naming the
    flag."""
    worker, _ = servers
    store = RedisStateStore(module_redis.url)
    # two requests at once: within the worker's --max-concurrent-rpcs (WORKER_CALLS)
    router = await start_router(store, metrics_port=None, max_kserve_stream_requests=2,
                                grpc_limits=GrpcPortLimits(write_timeout_s=1.0))
    try:
        # no BDP probing: the client's window stays at HTTP/2's 64 KiB, which a few hundred
        # token responses fill
        async with grpc.aio.insecure_channel(router.target, options=[("grpc.http2.bdp_probe", 0)]) as channel:
            async def requests() -> AsyncIterator[kserve_pb.ModelInferRequest]:
                for i in range(400):
                    yield streamed_request(i, 64)
                    await asyncio.sleep(0.02)
                await asyncio.Event().wait()

            call = kserve_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())
            await settled(lambda: router.calls_in_flight == 1, within_s=30)  # the stream began
            await settled(lambda: router.calls_in_flight == 0, within_s=30)  # cut, nothing read
            await settled(lambda: worker_idle(worker), within_s=30)
            received = 0
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                async with asyncio.timeout(30):
                    async for _ in call:  # what was in flight, then the status
                        received += 1
            assert received > 0
            assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "(grpc_write_timeout_s, flag --grpc-write-timeout-s)" in (cut.value.details() or "")
        await settled(lambda: worker.calls_in_flight == 0)  # the router's calls to it have ended
        assert len(await tokens(router.target)) == 2  # served on
    finally:
        await router.stop(grace_s=0.5)
        await store.close()



async def test_a_kserve_stream_read_slower_than_it_is_written_is_cut_with_its_status(
        servers: tuple[WorkerServer, RouterServer], module_redis: RedisProc) -> None:
    """A client that reads in bursts with pauses past ``--grpc-write-timeout-s`` while it keeps
    sending requests (the pattern of the second probe) gets DEADLINE_EXCEEDED naming the flag.
    Read with grpc's synchronous client: grpc.aio's client reports its own INTERNAL ("Internal
    error from Core") instead when the server's status races one of its request writes, for any
    server (DECISIONS 175)."""
    worker, _ = servers
    store = RedisStateStore(module_redis.url)
    router = await start_router(store, metrics_port=None, max_kserve_stream_requests=2,
                                grpc_limits=GrpcPortLimits(write_timeout_s=1.0))

    def read_in_bursts() -> tuple[int, grpc.RpcError]:
        ended = threading.Event()

        def requests() -> Iterator[kserve_pb.ModelInferRequest]:
            for i in range(2000):
                if ended.wait(0.02):
                    return
                yield streamed_request(i, 64)

        # a small receive window (no BDP probing, 4 KiB of lookahead): a pause fills it at once
        options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)]
        with grpc.insecure_channel(router.target, options=options) as channel:
            stream = kserve_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=60)
            received = 0
            try:
                for _ in stream:
                    received += 1
                    if received % 50 == 0:
                        time.sleep(2.0)  # a pause past the write timeout
            except grpc.RpcError as err:
                return received, err
            finally:
                ended.set()
        raise AssertionError("the stream was never cut")

    try:
        received, err = await asyncio.to_thread(read_in_bursts)
        assert received >= 50
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (err.code(), err.details())
        assert "(grpc_write_timeout_s, flag --grpc-write-timeout-s)" in (err.details() or "")
        await settled(lambda: router.calls_in_flight == 0, within_s=30)
        await settled(lambda: worker_idle(worker), within_s=30)
        await settled(lambda: worker.calls_in_flight == 0)
        assert len(await tokens(router.target)) == 2  # served on
    finally:
        await router.stop(grace_s=0.5)
        await store.close()
