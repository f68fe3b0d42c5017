"""The gRPC ports' limits as the router and the worker apply them (``llmserve.grpc_limits``): a
real worker (tiny model) and a real router in this event loop over a real Redis. On the router:
a call past ``--max-concurrent-rpcs`` is refused naming it and counted while probes still
answer, and a connection that never handshakes is closed. On the worker: the same handshake
deadline, and gRPC's own limiter standing behind ``--max-concurrent-streams`` against calls
whose request never comes. Served in full again once the held calls go.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpu_worker.server import WorkerServer
from llmserve.fleet.redis_store import RedisStateStore
from llmserve.grpc_limits import GrpcPortLimits, core_call_limit
from llmserve.kserve import grpc_service_pb2 as kserve_pb
from llmserve.kserve import grpc_service_pb2_grpc as kserve_grpc
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from router.request_telemetry import UNKNOWN_MODEL
from router.server import RouterServer
from tests.helpers.stalled_clients import half_open, silent_connection_closed
from tests.router.inprocess import start_router, start_worker
from tests.router.router_procs import RedisProc

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "kilo"
WORKER_STREAMS = 2
GENERATE = "/llmserve.v1.Generation/Generate"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers(module_redis: RedisProc, router_tiny_model: Path) -> AsyncIterator[tuple[WorkerServer,
                                                                                           RouterServer]]:
    store = RedisStateStore(module_redis.url)
    worker = await start_worker(router_tiny_model, MODEL, module_redis.url,
                                grpc_limits=GrpcPortLimits(handshake_timeout_s=0.3, max_connection_idle_s=0),
                                max_concurrent_streams=WORKER_STREAMS)
    router = await start_router(store, max_concurrent_rpcs=1, metrics_port=None,
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


async def tokens(target: str) -> list[int]:
    async with grpc.aio.insecure_channel(target) as channel:
        chunks = [c async for c in gen_grpc.GenerationStub(channel).Generate(request(), timeout=60)]
    return [t for c in chunks for t in c.token_ids]


async def test_the_router_refuses_calls_past_its_limit_naming_it(servers: tuple[WorkerServer, RouterServer]
                                                               ) -> None:
    _, router = servers
    assert len(await tokens(router.target)) == 2
    async with grpc.aio.insecure_channel(router.target) as channel:
        held = half_open(channel, GENERATE)
        async with asyncio.timeout(10):
            while router.calls_in_flight < 1:  # its headers reach the router
                await asyncio.sleep(0.02)
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
        async with asyncio.timeout(10):
            while router.calls_in_flight:
                await asyncio.sleep(0.02)
    assert len(await tokens(router.target)) == 2  # the held call's place is free again


async def test_both_ports_close_a_connection_that_never_handshakes(servers: tuple[WorkerServer, RouterServer]
                                                                 ) -> None:
    worker, router = servers
    assert await silent_connection_closed(router.port)
    assert await silent_connection_closed(worker.port)


async def test_the_worker_bounds_calls_whose_request_never_comes(servers: tuple[WorkerServer, RouterServer]
                                                               ) -> None:
    worker, router = servers
    flood = core_call_limit(WORKER_STREAMS) + 4
    async with grpc.aio.insecure_channel(worker.target) as channel:
        calls = [half_open(channel, GENERATE) for _ in range(flood)]

        async def ending(call: Any) -> grpc.StatusCode:
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        done, pending = await asyncio.wait([asyncio.create_task(ending(c)) for c in calls], timeout=3)
        assert [t.result() for t in done] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4  # at once
        for call in calls:
            call.cancel()
        await asyncio.wait(pending, timeout=5)
    assert len(await tokens(router.target)) == 2  # through the router, on the freed worker
