"""The worker's event loop never waits for the engine: while the engine core is held inside a
long step and the fleet publisher resyncs its KV set, health checks answer and another stream's
chunks arrive (the resync's query is answered between steps, asynchronously)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.fleet import MemoryStateStore
from llmserve.hashing import block_hashes
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from tests.gpu_worker.server.worker_server_helpers import SERVED_NAME, greedy

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
WAIT_S = 60.0  # how long the held step waits for the test at most (a broken loop hits it)


class StepGate:
    """Holds the engine core inside the second step after :meth:`arm`, until :meth:`release`."""

    def __init__(self, runner: Any) -> None:
        self._execute = runner.execute_async
        self._armed_steps = -1  # steps seen since arm(); -1: not armed
        self.held = threading.Event()  # the core is inside the held step
        self.released = threading.Event()
        self.step_ended = threading.Event()
        runner.execute_async = self._gated  # fault injection on the real runner

    def arm(self) -> None:
        self._armed_steps = 0

    def release(self) -> None:
        self.released.set()

    def _gated(self, sched_out: Any) -> Any:
        if self._armed_steps >= 0:
            self._armed_steps += 1
            if self._armed_steps == 2:  # the first armed step's outputs are already out
                self.held.set()
                self.released.wait(WAIT_S)
                self.step_ended.set()
        return self._execute(sched_out)


async def test_long_step_does_not_block_health_streams_or_kv_resync(engine_config: EngineConfig) -> None:
    config = dataclasses.replace(engine_config, engine_core_process=False, async_scheduling=False)
    store = MemoryStateStore()
    server = WorkerServer(config, ServerConfig(port=0, drain_grace_s=1), fleet_store=store)
    await server.start()
    await server.wait_ready()
    gate = StepGate(server.service.engine.client.core.runner)  # type: ignore[attr-defined]
    async with grpc.aio.insecure_channel(server.target) as channel:
        gen = pb_grpc.GenerationStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        # A finished request leaves cached blocks: the KV set a resync must republish.
        first = gen.Generate(pb.GenerateRequest(model=SERVED_NAME, prompt=PROMPT, sampling=greedy(2)))
        async for _ in first:
            pass
        stream = gen.Generate(pb.GenerateRequest(model=SERVED_NAME, prompt="Hi", sampling=greedy(400)))
        await stream.read()
        worker_id = server.service.worker_id
        chain = _prompt_chain(server)
        await _until_published(store, worker_id, chain)  # the prompt's blocks reached the store

        gate.arm()
        assert await asyncio.to_thread(gate.held.wait, WAIT_S)
        # The store loses this worker (a Redis flush): its next heartbeat finds the sync marker gone
        # and the publisher asks the engine for every cached hash, which only the held core knows.
        await store.remove_worker(worker_id)
        while not any(w.worker_id == worker_id for w in (await store.read_fleet()).workers):
            await asyncio.sleep(0.05)  # re-registered: the resync's query is now waiting
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        chunk = await asyncio.wait_for(stream.read(), 10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert isinstance(chunk, pb.GenerateResponse) and chunk.token_ids
        assert not gate.step_ended.is_set(), "the event loop only got here after the step"
        assert await store.match_prefixes({worker_id: chain}) == {worker_id: 0}

        gate.release()
        await _until_published(store, worker_id, chain)  # the resync completes between steps
        stream.cancel()
    await server.drain(0.5)


async def _until_published(store: MemoryStateStore, worker_id: str, chain: list[bytes]) -> None:
    for _ in range(400):
        if (await store.match_prefixes({worker_id: chain}))[worker_id] == len(chain):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the prompt's blocks never reached the store")


def _prompt_chain(server: WorkerServer) -> list[bytes]:
    ids = server.service.engine.tokenizer.encode(PROMPT)
    return block_hashes(ids, 16, seed=SERVED_NAME)
