"""A worker whose registry record expires while a stream runs on it (its heartbeat stalled, the
store lost it): the router retires its channel without cutting the stream, and when the
channel's grace runs out the stream ends with UNAVAILABLE, never as a silent cancel.

One real `python -m gpu_worker` serves "eps"; it registers itself in Redis database 1, and the
test copies its record into database 0, the routers' registry, for as long as it wants the worker
to be seen (its "heartbeat"). The worker is frozen (SIGSTOP, shorter than the router's
keepalive) while its record expires, so the stream is in flight when its channel is retired.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llmserve.fleet.redis_store import RedisStateStore
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from router.server import RouterServer
from tests.helpers.service_procs import scrape_metrics
from tests.router.router_procs import RedisProc, WorkerProc, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "eps"
MAX_TOKENS = 400
SAMPLING = gen_pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


class CopiedHeartbeat:
    """Copies the worker's record from its own database into the routers' while running."""

    def __init__(self, source: RedisStateStore, target: RedisStateStore, worker_id: str) -> None:
        self._source, self._target, self._worker_id = source, target, worker_id
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """No more heartbeats: the record expires within its TTL (1 s)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            for record in (await self._source.read_fleet()).workers:
                if record.worker_id == self._worker_id:
                    await self._target.heartbeat(record, ttl_s=1.0)
            await asyncio.sleep(0.2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker(module_redis: RedisProc, router_tiny_model: Path,
                 tmp_path_factory: Any) -> AsyncIterator[tuple[WorkerProc, CopiedHeartbeat]]:
    own_db = module_redis.url.removesuffix("/0") + "/1"
    proc = WorkerProc(router_tiny_model, MODEL, own_db, tmp_path_factory.mktemp("worker-logs"),
                      ("--num-kv-blocks", "96", "--max-num-seqs", "2"))
    source, target = RedisStateStore(own_db), RedisStateStore(module_redis.url)
    try:
        await asyncio.to_thread(proc.wait_serving)
        yield proc, CopiedHeartbeat(source, target, proc.worker_id)
    finally:
        proc.stop()
        await source.close()
        await target.close()


async def _stream_across_expiry(router: RouterServer, worker: WorkerProc, heartbeat: CopiedHeartbeat,
                                after_retired_s: float) -> tuple[list[gen_pb.GenerateResponse],
                                                                 grpc.aio.AioRpcError | None]:
    """Start a stream, freeze the worker (SIGSTOP: the stream stays in flight) and stop its
    heartbeat; once its record expired and its channel was retired, wait ``after_retired_s``, let
    the worker go on and read the rest: (chunks, the final error)."""
    heartbeat.start()

    async def seen() -> bool:
        return bool((await router.registry.refresh()).workers)

    try:
        await wait_until(seen, timeout_s=10)
        async with grpc.aio.insecure_channel(router.target) as channel:
            call = gen_grpc.GenerationStub(channel).Generate(
                gen_pb.GenerateRequest(model=MODEL, prompt="once upon a time", sampling=SAMPLING), timeout=60)
            chunks = [await call.read()]
            worker.proc.send_signal(signal.SIGSTOP)
            try:
                await heartbeat.stop()

                async def retired() -> bool:
                    return not router.channels.dialed(worker.address)

                await wait_until(retired, timeout_s=10)  # record expired (1 s TTL), swept (every 0.2 s)
                assert router.channels.retiring() == 1, "the stream was in flight when its channel retired"
                await asyncio.sleep(after_retired_s)
            finally:
                worker.proc.send_signal(signal.SIGCONT)
            try:
                while (chunk := await asyncio.wait_for(call.read(), 30)) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                    chunks.append(chunk)
            except grpc.aio.AioRpcError as exc:
                return chunks, exc
            return chunks, None
    finally:
        await heartbeat.stop()


def _outcomes(router: RouterServer) -> dict[str, float]:
    assert router.metrics_port is not None
    samples = scrape_metrics(router.metrics_port).items()
    return {dict(labels)["outcome"]: value for (name, labels), value in samples
            if name == "llmserve:router_requests_total" and dict(labels).get("model") == MODEL}


async def test_a_stream_outlives_its_workers_registry_record(
    worker: tuple[WorkerProc, CopiedHeartbeat], make_router: Any
) -> None:
    proc, heartbeat = worker
    router = await make_router("least-load", registry_cache_s=0.1, channel_sweep_s=0.2, metrics_port=0)
    chunks, error = await _stream_across_expiry(router, proc, heartbeat, after_retired_s=0.5)
    assert error is None, f"{error.code()}: {error.details()}" if error else ""
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == MAX_TOKENS and chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS and chunks[-1].worker_id == proc.worker_id
    assert _outcomes(router) == {"ok": 1.0}


async def test_a_channel_closed_under_a_stream_ends_it_unavailable_not_cancelled(
    worker: tuple[WorkerProc, CopiedHeartbeat], make_router: Any
) -> None:
    proc, heartbeat = worker
    router = await make_router("least-load", registry_cache_s=0.1, channel_sweep_s=0.2, metrics_port=0,
                               channel_retire_grace_s=0.2)
    chunks, error = await _stream_across_expiry(router, proc, heartbeat, after_retired_s=1.0)
    assert error is not None, "the retired channel closed after 0.2 s, under the frozen worker's stream"
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "closed its connection to the worker" in (error.details() or "")
    assert chunks and not chunks[-1].HasField("usage")
    assert _outcomes(router) == {"unavailable": 1.0}, "a failure, not a client's cancel"
