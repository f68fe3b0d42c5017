"""Real processes for the router tests: redis-server and `python -m gpu_worker` workers
(:class:`~tests.helpers.service_procs.WorkerProc`: subprocesses, so SIGKILL is real; each waits,
bounded, for gRPC health SERVING), and client helpers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc

from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from tests.helpers.redis_server import RedisServer, free_port
from tests.helpers.service_procs import WorkerProc

__all__ = ["RedisProc", "WorkerProc", "free_port", "generate", "start_workers", "wait_until"]

# The suite's one redis-server helper, under the name these tests use.
RedisProc = RedisServer


def start_workers(workers: Sequence[WorkerProc]) -> None:
    for w in workers:
        w.wait_serving()


async def generate(target: str, *, model: str, timeout_s: float = 60.0,
                   **kwargs: object) -> tuple[list[gen_pb.GenerateResponse], str]:
    """All chunks of one Generate call and the serving worker id."""
    sampling = kwargs.pop("sampling", None) or gen_pb.SamplingParams(max_tokens=4, temperature=0.0)
    request = gen_pb.GenerateRequest(model=model, sampling=sampling, **kwargs)  # type: ignore[arg-type]
    async with grpc.aio.insecure_channel(target) as channel:
        chunks = [c async for c in gen_grpc.GenerationStub(channel).Generate(request, timeout=timeout_s)]
    return chunks, chunks[-1].worker_id


async def wait_until(cond, timeout_s: float = 20.0, interval_s: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    """Poll an async condition until true (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await cond():
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(interval_s)
