"""The router forwards a request's priority and fills in the model's default (--default-priority):
through a real router, a request without a priority of a model whose default is high overtakes
queued requests that asked for a low one on a worker with the priority policy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.fleet.redis_store import RedisStateStore
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from router.__main__ import config_from_args, parse_args, parse_default_priority
from router.server import RouterServer
from tests.helpers.redis_server import free_port
from tests.router.inprocess import start_router
from tests.router.router_procs import RedisProc

MODEL = "prio"


def test_default_priority_flags() -> None:
    assert parse_default_priority(["a=1", "b/c=d=-2"]) == {"a": 1, "b/c=d": -2}
    assert parse_default_priority("a=1,b=2") == {"a": 1, "b": 2}  # the variable's form
    with pytest.raises(ValueError, match="MODEL=PRIORITY"):
        parse_default_priority(["a"])
    args = parse_args(["--redis-url", "redis://x", "--default-priority", "m=3"], environ={})
    assert config_from_args(args).default_priority == {"m": 3}
    from_env = parse_args(["--redis-url", "redis://x"], environ={"LLMSERVE_DEFAULT_PRIORITY": "m=3,n=-1"})
    assert config_from_args(from_env).default_priority == {"m": 3, "n": -1}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(module_redis: RedisProc, router_tiny_model: Path
                ) -> AsyncIterator[tuple[RouterServer, WorkerServer]]:
    port = free_port()
    engine = EngineConfig(model=str(router_tiny_model), served_model_name=MODEL, device="cpu",
                          num_kv_blocks=128, max_num_seqs=1, scheduling_policy="priority")
    worker = WorkerServer(engine, ServerConfig(port=port, advertise_address=f"127.0.0.1:{port}",
                                               redis_url=module_redis.url, drain_grace_s=1.0))
    await worker.start()
    await worker.wait_ready()
    store = RedisStateStore(module_redis.url)
    server = await start_router(store, default_priority={MODEL: -1})
    yield server, worker
    await server.stop(grace_s=0.5)
    await store.close()
    await worker.drain(0.5)


async def waiting(worker: WorkerServer, n: int) -> None:
    """Until ``n`` requests wait in the worker's queue."""
    for _ in range(2000):
        if worker.service.engine.stats().num_waiting >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the requests never queued")


@pytest.mark.asyncio(loop_scope="module")
async def test_forwarded_and_default_priorities_order_the_queue(
    fleet: tuple[RouterServer, WorkerServer],
) -> None:
    router, worker = fleet
    async with grpc.aio.insecure_channel(router.target) as channel:
        stub = gen_grpc.GenerationStub(channel)

        def call(max_tokens: int, **kw: object) -> grpc.aio.UnaryStreamCall:
            sampling = gen_pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            return stub.Generate(gen_pb.GenerateRequest(model=MODEL, prompt="hi", sampling=sampling, **kw),
                                 timeout=60)  # type: ignore[arg-type]

        long = call(400)
        assert (await long.read()).token_ids  # the worker's one slot is taken
        finished: list[str] = []

        async def drain(rpc: grpc.aio.UnaryStreamCall) -> None:
            while await rpc.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass

        async def run(name: str, **kw: object) -> None:
            await drain(call(2, **kw))
            finished.append(name)

        low = [asyncio.create_task(run(f"low{i}", priority=5)) for i in range(2)]
        await waiting(worker, 2)  # both queued behind the long one
        default = asyncio.create_task(run("default"))  # no priority: the router sends the model's -1
        await asyncio.gather(drain(long), *low, default)
    assert finished[0] == "default", finished
