"""Failures on real processes: Redis restarted under load, a worker SIGKILLed mid-queue and
mid-stream (its running stream resumes on the other worker; its queued one is retried).

Two `python -m gpu_worker` subprocesses serve "kappa" (max_num_seqs 1, so a second request
queues behind a running one); routers run in this process on the module's redis-server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llmserve.fleet.redis_store import RedisStateStore
from llmserve.hashing import block_hashes
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from llmserve.v1 import internal_pb2 as int_pb
from llmserve.v1 import internal_pb2_grpc as int_grpc
from tests.router.router_procs import RedisProc, WorkerProc, generate, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "kappa"
WORKER_ARGS = ("--num-kv-blocks", "96", "--max-num-seqs", "1")
TTL_S = 5.0  # the publisher's default record TTL


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def workers(module_redis: RedisProc, router_tiny_model: Path,
                  tmp_path_factory: Any) -> AsyncIterator[dict[str, WorkerProc]]:
    logs = tmp_path_factory.mktemp("worker-logs")
    procs = {f"k{i}": WorkerProc(router_tiny_model, MODEL, module_redis.url, logs, WORKER_ARGS, f"k{i}")
             for i in range(2)}
    store = RedisStateStore(module_redis.url)
    try:
        for w in procs.values():
            await asyncio.to_thread(w.wait_serving)

        async def registered() -> bool:
            return len((await store.read_fleet()).workers) == 2

        await wait_until(registered)
        yield procs
    finally:
        for w in procs.values():
            w.stop()
        await store.close()


def prompt(tag: str, n: int = 120) -> str:
    common = ("the", "of", "and", "to", "in", "is", "you", "that")
    return tag + " " + " ".join(common[i % 8] for i in range(n - 1))


async def test_redis_restart_under_load_loses_no_request(
    workers: dict[str, WorkerProc], module_redis: RedisProc, make_router: Any
) -> None:
    router = await make_router("prefix")
    store = RedisStateStore(module_redis.url)
    warm = prompt("warm")
    await generate(router.target, model=MODEL, prompt=warm)
    done: list[tuple[float, str]] = []
    errors: list[str] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        j = 0
        while not stop.is_set():
            j += 1
            try:
                text = warm if i == 0 and j % 2 else prompt(f"c{i}x{j % 3}", 40)  # keeps `warm` cached
                _, wid = await generate(router.target, model=MODEL, prompt=text)
                done.append((time.monotonic(), wid))
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")

    clients = [asyncio.create_task(client(i)) for i in range(3)]
    try:
        await wait_until(lambda: _true(len(done) >= 3))
        module_redis.stop()
        down_at = time.monotonic()
        await wait_until(lambda: _true(len([t for t, _ in done if t > down_at + 1.5]) >= 3), timeout_s=60)
        snap = await router.registry.snapshot()
        assert snap.stale and {w.worker_id for w in snap.workers} == set(workers), "last known registry"
        module_redis.start()  # empty Redis, same port
        up_at = time.monotonic()

        async def re_registered() -> bool:
            try:
                view = await store.read_fleet()
                chain = block_hashes(await _ids(router, warm), 16, seed=MODEL)
                matched = await store.match_prefixes({w: chain for w in workers})
            except Exception:
                return False
            return {w.worker_id for w in view.workers} == set(workers) and max(matched.values()) == len(chain)

        await wait_until(re_registered, timeout_s=30)  # records and KV sets republished
        await wait_until(lambda: _true(len([t for t, _ in done if t > up_at]) >= 3), timeout_s=60)
    finally:
        stop.set()
        await asyncio.gather(*clients)
        await store.close()
    assert errors == [], errors
    assert len([t for t, _ in done if down_at < t < up_at]) >= 3, "requests were served while Redis was down"
    assert {w for _, w in done} == set(workers)


async def test_sigkilled_worker_is_dropped_and_requests_are_retried_or_resumed(
    workers: dict[str, WorkerProc], module_redis: RedisProc, make_router: Any
) -> None:
    router = await make_router("prefix")
    store = RedisStateStore(module_redis.url)
    base = prompt("victim", 40)
    _, victim_id = await generate(router.target, model=MODEL, prompt=base)
    survivor_id = next(w for w in workers if w != victim_id)
    victim = workers[victim_id]
    chain = block_hashes(await _ids(router, base), 16, seed=MODEL)

    async def cached() -> bool:
        return (await store.match_prefixes({victim_id: chain}))[victim_id] == len(chain)

    await wait_until(cached)

    # A long request runs on the victim; a second one sharing its prefix queues behind it there.
    long_sampling = gen_pb.SamplingParams(max_tokens=440, temperature=0.0, ignore_eos=True)
    async with grpc.aio.insecure_channel(router.target) as channel:
        stub = gen_grpc.GenerationStub(channel)
        running = stub.Generate(gen_pb.GenerateRequest(model=MODEL, prompt=base, sampling=long_sampling))
        first = await running.read()
        assert first.token_ids
        queued_task = asyncio.create_task(generate(router.target, model=MODEL, prompt=base + " next"))

        async def queued_on_victim() -> bool:
            async with grpc.aio.insecure_channel(victim.address) as ch:
                info = await int_grpc.WorkerControlStub(ch).GetWorkerInfo(int_pb.GetWorkerInfoRequest())
            return info.load.num_waiting == 1

        await wait_until(queued_on_victim, timeout_s=10, interval_s=0.01)
        victim.kill()
        rest = []  # it had produced tokens: resumed on the survivor, one unbroken stream
        while (chunk := await running.read()) is not grpc.aio.EOF:
            rest.append(chunk)
        tokens = list(first.token_ids) + [t for c in rest for t in c.token_ids]
        assert rest[-1].worker_id == survivor_id and rest[-1].finish_reason == "length"
        assert rest[-1].usage.completion_tokens == len(tokens) == 440
    chunks, wid = await queued_task
    assert wid == survivor_id and chunks[-1].finish_reason, "the queued request was retried transparently"
    alone, _ = await generate(router.target, model=MODEL, prompt=base, sampling=long_sampling)
    assert tokens == [t for c in alone for t in c.token_ids], "the same tokens as an uninterrupted run"

    # Until its record expires the router still ranks the dead worker first: retried too.
    model, candidates = await router.router.resolve(MODEL)
    if victim_id in {w.worker_id for w in candidates}:
        follow = base + " another"
        ranked = await router.router.rank(model, candidates, await _ids(router, follow), "probe")
        assert ranked.workers[0].worker_id == victim_id
        _, wid = await generate(router.target, model=MODEL, prompt=follow)
        assert wid == survivor_id

    killed_at = time.monotonic()

    async def gone() -> bool:
        return victim_id not in {w.worker_id for w in (await store.read_fleet()).workers}

    await wait_until(gone, timeout_s=TTL_S + 2)
    assert time.monotonic() - killed_at <= TTL_S + 2
    for i in range(4):
        _, wid = await generate(router.target, model=MODEL, prompt=prompt(f"after{i}", 30))
        assert wid == survivor_id
    await store.close()


async def _ids(router: Any, text: str) -> list[int]:
    _, candidates = await router.router.resolve(MODEL)
    return await router.router.token_ids(MODEL, candidates, text)  # type: ignore[no-any-return]


async def _true(value: bool) -> bool:
    return value


async def test_a_stream_resumes_on_a_worker_the_routers_cached_view_missed(
    workers: dict[str, WorkerProc], module_redis: RedisProc, make_router: Any, router_tiny_model: Path,
    tmp_path: Path,
) -> None:
    """Found by the chaos suite: a stream's candidates come from the router's cached view of the
    fleet; when all of them failed after the first token (here the only one, the view taken while
    the other worker's record was missing), the stream failed UNAVAILABLE although a live worker
    had registered since. It now resumes there, found by a fresh read of the registry."""
    survivors = {w for w, proc in workers.items() if proc.proc.poll() is None}
    victim = WorkerProc(router_tiny_model, MODEL, module_redis.url, tmp_path, WORKER_ARGS, "k-victim")
    store = RedisStateStore(module_redis.url)
    try:
        await asyncio.to_thread(victim.wait_serving)
        router = await make_router("least-load", registry_cache_s=600.0)
        for _ in range(20):  # the survivors' records removed just before the router's read
            for worker_id in survivors:
                await store.remove_worker(worker_id)
            view = await router.router.registry.refresh()
            if {w.worker_id for w in view.workers} == {victim.worker_id}:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("could not take a view without the survivor")
        await wait_until(lambda: _registered(store, survivors), timeout_s=10)  # they heartbeat again

        sampling = gen_pb.SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        base = prompt("missed", 30)
        async with grpc.aio.insecure_channel(router.target) as channel:
            call = gen_grpc.GenerationStub(channel).Generate(
                gen_pb.GenerateRequest(model=MODEL, prompt=base, sampling=sampling), timeout=120)
            first = await call.read()
            assert first.token_ids and first.worker_id in ("", victim.worker_id)
            victim.kill()
            rest = []
            while (chunk := await call.read()) is not grpc.aio.EOF:
                rest.append(chunk)
        tokens = list(first.token_ids) + [t for c in rest for t in c.token_ids]
        assert rest[-1].worker_id in survivors and rest[-1].finish_reason == "length"
        alone, _ = await generate(router.target, model=MODEL, prompt=base, sampling=sampling)
        assert tokens == [t for c in alone for t in c.token_ids], "the same tokens as an uninterrupted run"
    finally:
        victim.stop()
        await store.remove_worker(victim.worker_id)
        await store.close()


async def _registered(store: RedisStateStore, worker_ids: set[str]) -> bool:
    return worker_ids <= {w.worker_id for w in (await store.read_fleet()).workers}
