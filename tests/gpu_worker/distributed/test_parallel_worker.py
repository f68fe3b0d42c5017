"""A tensor-parallel worker (TP=2 on the CPU, gloo) as a real `python -m gpu_worker` process behind a
real router: one endpoint and one fleet record; streams equal one rank's tokens; cancellations
and deadlines reach every rank (their per-request rows would run out otherwise); drain; and a
killed rank takes the worker out of service and makes it exit non-zero."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from gpu_worker import LLM, SamplingParams
from llmserve.fleet.redis_store import RedisStateStore
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from llmserve.v1 import internal_pb2 as int_pb
from llmserve.v1 import internal_pb2_grpc as int_grpc
from router.server import RouterServer
from tests.helpers.redis_server import RedisServer
from tests.router.inprocess import start_router
from tests.router.router_procs import WorkerProc, wait_until

MODEL = "tp-llama"
MAX_NUM_SEQS = 4  # rows per rank: a rank that kept aborted requests' rows would run out
TP_ARGS = ["--tensor-parallel-size", "2", "--num-kv-blocks", "64", "--max-num-seqs", str(MAX_NUM_SEQS)]
PROMPT = [5, 17, 29, 41, 53, 65, 77, 89, 101, 113, 125, 137, 149, 161, 173, 185, 197, 209]


@pytest_asyncio.fixture
async def fleet(
    tiny_model: Callable[[str], Path], redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[WorkerProc, RouterServer]]:
    worker = WorkerProc(tiny_model("llama"), MODEL, redis_server.url, tmp_path, extra=TP_ARGS)
    store = RedisStateStore(redis_server.url)
    try:
        await asyncio.to_thread(worker.wait_serving, 180.0)
        router = await start_router(store)
        yield worker, router
        await router.stop(grace_s=0.5)
    finally:
        worker.stop()
        await store.close()


def request(max_tokens: int) -> gen_pb.GenerateRequest:
    sampling = gen_pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompt = gen_pb.TokenIds(ids=PROMPT)
    return gen_pb.GenerateRequest(model=MODEL, prompt_token_ids=prompt, sampling=sampling)


async def collect(stub: gen_grpc.GenerationStub, max_tokens: int) -> list[int]:
    return [t async for c in stub.Generate(request(max_tokens), timeout=60) for t in c.token_ids]


async def worker_info(worker: WorkerProc) -> int_pb.GetWorkerInfoResponse:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        return await int_grpc.WorkerControlStub(channel).GetWorkerInfo(int_pb.GetWorkerInfoRequest())


async def test_tp2_worker_behind_the_router(
    fleet: tuple[WorkerProc, RouterServer], tiny_model: Callable[[str], Path]
) -> None:
    worker, router = fleet
    with LLM(model=str(tiny_model("llama")), num_kv_blocks=64) as llm:  # one rank, the reference
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        want = list(llm.generate([PROMPT], params)[0].outputs[0].token_ids)
    async with grpc.aio.insecure_channel(router.target) as channel:
        stub = gen_grpc.GenerationStub(channel)
        models = await stub.ListModels(gen_pb.ListModelsRequest())
        assert [(m.name, m.num_workers) for m in models.models] == [(MODEL, 1)]  # one worker, 2 GPUs
        assert await collect(stub, 24) == want

        # Twice as many cancelled streams as each rank has rows, then a deadline: every rank must
        # have dropped their rows (the next requests need all of them).
        for _ in range(2):
            calls = [stub.Generate(request(400)) for _ in range(MAX_NUM_SEQS)]
            for call in calls:
                await call.read()
            for call in calls:
                call.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect_with_timeout(stub, 0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        async def idle() -> bool:
            info = await worker_info(worker)
            return info.load.num_running == 0 and info.load.num_waiting == 0

        await wait_until(idle, timeout_s=30)
        results = await asyncio.gather(*(collect(stub, 24) for _ in range(MAX_NUM_SEQS)))
        assert results == [want] * MAX_NUM_SEQS

        # Drain: the stream in flight finishes, the worker exits cleanly and leaves the fleet.
        stream = stub.Generate(request(48))
        tokens = list((await stream.read()).token_ids)
        async with grpc.aio.insecure_channel(worker.address) as control:
            await int_grpc.WorkerControlStub(control).Drain(int_pb.DrainRequest())
        while (chunk := await stream.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            tokens.extend(chunk.token_ids)
        assert len(tokens) == 48
        assert await asyncio.to_thread(worker.proc.wait, 60) == 0


async def collect_with_timeout(stub: gen_grpc.GenerationStub, timeout_s: float) -> list[int]:
    call = stub.Generate(request(400), timeout=timeout_s)
    return [t async for c in call for t in c.token_ids]


async def test_a_killed_rank_takes_the_worker_out(fleet: tuple[WorkerProc, RouterServer]) -> None:
    worker, router = fleet
    match = re.search(r"ranks 1 \(pid (\d+)\)", worker.log_path.read_text())
    assert match, worker.log_path.read_text()[-2000:]
    os.kill(int(match.group(1)), signal.SIGKILL)
    # The engine core notices and ends itself; the worker stops serving and exits non-zero
    # (within 10 s: a liveness bound, not a timing measurement).
    code = await asyncio.to_thread(worker.proc.wait, 10)
    assert code != 0
    log = worker.log_path.read_text()
    assert "rank process llmserve-rank-1" in log and "engine core died" in log
    async with grpc.aio.insecure_channel(router.target) as channel:
        stub = gen_grpc.GenerationStub(channel)

        async def gone() -> bool:
            models = await stub.ListModels(gen_pb.ListModelsRequest())
            return all(m.num_workers == 0 for m in models.models)

        await wait_until(gone, timeout_s=20)  # deregistered: the router sends it nothing more
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, 4)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_worker_help_lists_the_parallel_flags() -> None:
    cmd = [sys.executable, "-m", "gpu_worker", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    for flag in ("--tensor-parallel-size", "--pipeline-parallel-size", "--distributed-port"):
        assert flag in out, flag
