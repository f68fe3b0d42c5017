"""Worker lifecycle on loopback with the real engine: health while loading, drain, limits."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from gpu_worker.server.types import ServedEngine
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from llmserve.v1 import internal_pb2 as ipb
from llmserve.v1 import internal_pb2_grpc as ipb_grpc
from tests.gpu_worker.server.worker_server_helpers import SERVED_NAME, collect, greedy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def real_engine(config: EngineConfig) -> ServedEngine:
    from gpu_worker.engine.async_llm import AsyncLLM

    engine: ServedEngine = AsyncLLM.from_config(config)
    return engine


def request(prompt: str, max_tokens: int, **extra: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=SERVED_NAME, prompt=prompt, sampling=greedy(max_tokens, **extra))


async def test_health_turns_serving_after_load_and_drain_lets_streams_finish(
    engine_config: EngineConfig,
) -> None:
    gate = threading.Event()

    def gated_engine(config: EngineConfig) -> ServedEngine:
        assert gate.wait(120), "test never opened the gate"
        return real_engine(config)

    server = WorkerServer(engine_config, ServerConfig(port=0, drain_grace_s=60), gated_engine)
    await server.start()
    async with grpc.aio.insecure_channel(server.target) as channel:
        gen, control = pb_grpc.GenerationStub(channel), ipb_grpc.WorkerControlStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(gen.Generate(request("Hi", 4)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "not ready" in (err.value.details() or "")

        gate.set()
        assert (await watch.read()).status == SERVING
        await server.wait_ready()

        # Three long streams in flight, then drain: they all run to their full length.
        calls = [gen.Generate(request(f"Story {i}:", 300)) for i in range(3)]
        firsts = [await call.read() for call in calls]
        reply = await control.Drain(ipb.DrainRequest(grace_period_s=60))
        assert reply.in_flight == 3
        assert (await watch.read()).status == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(gen.Generate(request("Hi", 4)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in (err.value.details() or "")
        info = await control.GetWorkerInfo(ipb.GetWorkerInfoRequest())
        assert info.draining
        for first, call in zip(firsts, calls, strict=True):
            rest = await collect(call)
            assert len(first.token_ids) + len(rest.token_ids[0]) == 300
            assert rest.finish == {0: "length"}
            assert await call.code() == grpc.StatusCode.OK
    await asyncio.wait_for(server.wait_stopped(), 60)


async def test_drain_grace_over_aborts_the_rest(engine_config: EngineConfig) -> None:
    server = WorkerServer(engine_config, ServerConfig(port=0), real_engine)
    await server.start()
    await server.wait_ready()
    async with grpc.aio.insecure_channel(server.target) as channel:
        gen = pb_grpc.GenerationStub(channel)
        call = gen.Generate(request("Count forever:", 480, n=8))
        await call.read()
        await server.start_drain(grace_s=0.2)
        rest = await collect(call)
        assert set(rest.finish.values()) == {"abort"}
        assert rest.last.HasField("usage")
    await asyncio.wait_for(server.wait_stopped(), 60)


async def test_concurrent_stream_limit(engine_config: EngineConfig) -> None:
    config = dataclasses.replace(engine_config, max_num_seqs=1)
    server = WorkerServer(config, ServerConfig(port=0, max_concurrent_streams=2), real_engine)
    await server.start()
    await server.wait_ready()
    async with grpc.aio.insecure_channel(server.target) as channel:
        gen = pb_grpc.GenerationStub(channel)
        running = gen.Generate(request("A", 480))
        await running.read()
        waiting = gen.Generate(request("B", 4))
        await _wait_in_flight(server, 2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(gen.Generate(request("C", 4)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "concurrent streams" in (err.value.details() or "")
        running.cancel()
        assert len((await collect(waiting)).token_ids[0]) == 4
    await server.drain(0.1)


async def test_queue_full_is_resource_exhausted(engine_config: EngineConfig) -> None:
    config = dataclasses.replace(engine_config, max_num_seqs=1, max_queue_len=1)
    server = WorkerServer(config, ServerConfig(port=0), real_engine)
    await server.start()
    await server.wait_ready()
    async with grpc.aio.insecure_channel(server.target) as channel:
        gen, control = pb_grpc.GenerationStub(channel), ipb_grpc.WorkerControlStub(channel)
        running = gen.Generate(request("A", 480))
        await running.read()
        waiting = gen.Generate(request("B", 4))
        for _ in range(1000):
            if (await control.GetWorkerInfo(ipb.GetWorkerInfoRequest())).load.num_waiting == 1:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(gen.Generate(request("C", 4)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue" in (err.value.details() or "").lower()
        running.cancel()
        assert len((await collect(waiting)).token_ids[0]) == 4
    await server.drain(0.1)


async def test_load_failure_is_reported(engine_config: EngineConfig) -> None:
    def broken(config: EngineConfig) -> ServedEngine:
        raise OSError("no such model folder")

    server = WorkerServer(engine_config, ServerConfig(port=0), broken)
    await server.start()
    with pytest.raises(RuntimeError, match="failed to load"):
        await server.wait_ready()
    with pytest.raises(RuntimeError, match="failed to load"):
        await server.wait_stopped()


async def _wait_in_flight(server: WorkerServer, count: int) -> None:
    for _ in range(1000):
        if len(server.service.in_flight) == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} streams in flight, got {len(server.service.in_flight)}")


async def test_fleet_join_failure_after_the_engine_loads_is_reported(
    engine_config: EngineConfig, tmp_path: Path
) -> None:
    """The engine loads, then joining the fleet fails (the fleet secret file it is given does not
    exist): the worker stops and ``wait_ready`` raises instead of waiting forever (it did: the
    failure was lost in the load task, the state the one-process stack hung in on a machine
    without the Redis client). An unreachable Redis is not such a failure: the worker serves
    and its publisher retries."""
    with socket.socket() as s:  # a free port that nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    config = ServerConfig(port=0, redis_url=f"redis://127.0.0.1:{dead_port}",
                          fleet_secret_file=str(tmp_path / "missing-secret"))
    server = WorkerServer(engine_config, config, real_engine)
    await server.start()
    with pytest.raises(RuntimeError, match="failed to load") as err:
        await asyncio.wait_for(server.wait_ready(), 120)
    assert "fleet" in str(err.value)
    assert isinstance(err.value.__cause__, OSError), repr(err.value.__cause__)
    with pytest.raises(RuntimeError, match="failed to load"):
        await asyncio.wait_for(server.wait_stopped(), 60)
