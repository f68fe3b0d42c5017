"""One router fleet on real processes: redis-server, three `python -m gpu_worker` subprocesses
(two serving "alpha", one serving "beta", tiny random llama), routers in this process.

Covers: multi-model routing and ListModels, NOT_FOUND / UNAVAILABLE, prefix affinity with
cached prompt tokens (and round-robin not following), two routers agreeing, router/worker
tokenization and hashing parity, client cancellation and deadlines reaching the worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from llmserve.fleet.redis_store import RedisStateStore
from llmserve.hashing import block_hashes
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from llmserve.v1 import internal_pb2 as int_pb
from llmserve.v1 import internal_pb2_grpc as int_grpc
from router.server import RouterServer
from tests.router.router_procs import RedisProc, WorkerProc, generate, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

WORKER_ARGS = ("--num-kv-blocks", "96", "--max-num-seqs", "8")


class Fleet:
    def __init__(self, redis: RedisProc, alpha: list[WorkerProc], beta: WorkerProc, store: RedisStateStore):
        self.redis, self.alpha, self.beta, self.store = redis, alpha, beta, store

    @property
    def alpha_ids(self) -> set[str]:
        return {w.worker_id for w in self.alpha}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(
    module_redis: RedisProc, router_tiny_model: Path, tmp_path_factory: Any
) -> AsyncIterator[Fleet]:
    logs = tmp_path_factory.mktemp("worker-logs")
    alpha = [WorkerProc(router_tiny_model, "alpha", module_redis.url, logs, WORKER_ARGS, f"alpha-{i}")
             for i in range(2)]
    beta = WorkerProc(router_tiny_model, "beta", module_redis.url, logs, WORKER_ARGS, "beta-0")
    procs = [*alpha, beta]
    store = RedisStateStore(module_redis.url)
    try:
        for w in procs:
            await asyncio.to_thread(w.wait_serving)

        async def registered() -> bool:
            return len((await store.read_fleet()).workers) == 3

        await wait_until(registered)
        yield Fleet(module_redis, alpha, beta, store)
    finally:
        for w in procs:
            w.stop()
        await store.close()


WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more"
).split()


def text(tag: str, words: int) -> str:
    """A prompt of about ``words`` tokens (one per common word), whose first block is unique to ``tag``."""
    return tag + " " + " ".join(WORDS[(i * 7 + len(tag)) % len(WORDS)] for i in range(words - 1))


async def prompt_ids(router: RouterServer, model: str, prompt: str) -> list[int]:
    _, workers = await router.router.resolve(model)
    return await router.router.token_ids(model, workers, prompt)


async def wait_cached(fleet: Fleet, worker_id: str, ids: list[int], model: str) -> None:
    chain = block_hashes(ids, 16, seed=model)

    async def cached() -> bool:
        return (await fleet.store.match_prefixes({worker_id: chain}))[worker_id] == len(chain)

    await wait_until(cached)


async def test_multi_model_routing_and_list_models(fleet: Fleet, make_router: Any) -> None:
    router = await make_router("prefix")
    async with grpc.aio.insecure_channel(router.target) as channel:
        reply = await gen_grpc.GenerationStub(channel).ListModels(gen_pb.ListModelsRequest())
    listed = [(m.name, m.num_workers, m.max_model_len) for m in reply.models]
    assert listed == [("alpha", 2, 512), ("beta", 1, 512)]
    # Forwarded from the workers' records: weight format, KV cache, sizes (96 blocks of 16 tokens).
    formats = {(m.quantization, m.kv_cache_dtype, m.kv_cache_tokens) for m in reply.models}
    assert formats == {("none", "auto", 96 * 16)} and all(m.weight_bytes > 0 for m in reply.models)
    for i in range(4):
        chunks, wid = await generate(router.target, model="beta", prompt=text(f"b{i}", 40))
        assert wid == "beta-0" and chunks[-1].usage.completion_tokens == 4
        _, wid = await generate(router.target, model="alpha", prompt=text(f"a{i}", 40))
        assert wid in fleet.alpha_ids


async def test_unknown_model_not_found_and_gone_model_unavailable(fleet: Fleet, make_router: Any) -> None:
    router = await make_router("prefix")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(router.target, model="nope", prompt="hi")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in (err.value.details() or "") and "alpha" in (err.value.details() or "")
    # A worker of "gamma" registers (record only, short TTL) and vanishes: gamma is known but gone.
    from llmserve.fleet import WorkerRecord

    await fleet.store.heartbeat(WorkerRecord("gamma-0", "gamma", "127.0.0.1:1", 16, 512), ttl_s=0.5)
    codes: list[grpc.StatusCode] = []

    async def unavailable() -> bool:
        try:
            await generate(router.target, model="gamma", prompt="hi", timeout_s=5)
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())
            return exc.code() == grpc.StatusCode.UNAVAILABLE and "gamma" in (exc.details() or "")
        return False

    await wait_until(unavailable, timeout_s=15, interval_s=0.2)


async def test_prefix_routing_follows_the_cache_round_robin_does_not(fleet: Fleet, make_router: Any) -> None:
    router = await make_router("prefix")
    for i in range(3):
        base = text(f"sys{i}", 200)
        first, wid1 = await generate(router.target, model="alpha", prompt=base)
        assert first[-1].usage.cached_prompt_tokens == 0
        await wait_cached(fleet, wid1, await prompt_ids(router, "alpha", base), "alpha")
        follow, wid2 = await generate(router.target, model="alpha", prompt=base + " and a new question")
        assert wid2 == wid1, "the longer request goes where its prefix is cached"
        assert follow[-1].usage.cached_prompt_tokens >= 160

    rr = await make_router("round-robin")
    base = text("rr", 200)
    _, wid1 = await generate(rr.target, model="alpha", prompt=base)
    await wait_cached(fleet, wid1, await prompt_ids(rr, "alpha", base), "alpha")
    follow, wid2 = await generate(rr.target, model="alpha", prompt=base + " and a new question")
    assert wid2 != wid1 and follow[-1].usage.cached_prompt_tokens == 0


async def test_two_routers_make_the_same_choice(fleet: Fleet, make_router: Any) -> None:
    r1, r2 = await make_router("prefix"), await make_router("prefix")
    warm = text("shared", 200)
    _, wid = await generate(r1.target, model="alpha", prompt=warm)
    await wait_cached(fleet, wid, await prompt_ids(r1, "alpha", warm), "alpha")
    prompts = [warm + " q1", warm + " q2"] + [text(f"fresh{i}", 60) for i in range(10)]
    await r1.registry.refresh()
    await r2.registry.refresh()
    firsts = []
    for prompt in prompts:
        choices = []
        for r in (r1, r2):
            model, workers = await r.router.resolve("alpha")
            ids = await r.router.token_ids(model, workers, prompt)
            ranked = await r.router.rank(model, workers, ids, request_id="same")
            choices.append([w.worker_id for w in ranked.workers])
        assert choices[0] == choices[1], prompt
        firsts.append(choices[0][0])
    assert firsts[0] == firsts[1] == wid
    assert set(firsts[2:]) == fleet.alpha_ids, "fresh prefixes spread over both workers"
    for prompt in prompts[:4]:  # and over the wire: the same request from each router, one after the other
        _, a = await generate(r1.target, model="alpha", prompt=prompt)
        _, b = await generate(r2.target, model="alpha", prompt=prompt)
        assert a == b


async def test_router_and_worker_hash_blocks_identically(fleet: Fleet, make_router: Any) -> None:
    router = await make_router("prefix")
    client = aioredis.Redis.from_url(fleet.redis.url)
    key = "llmserve:kv:beta-0"
    ids = [1000 + (i * 7919) % 40000 for i in range(100)]  # 6 full blocks; +3 decoded tokens stay in block 6
    before = await client.smembers(key)
    chunks, wid = await generate(router.target, model="beta", prompt_token_ids=gen_pb.TokenIds(ids=ids))
    assert wid == "beta-0"
    expected = set(block_hashes(ids, 16, seed="beta"))
    assert len(expected) == 6

    async def published() -> bool:
        return expected <= await client.smembers(key)

    await wait_until(published)
    assert await client.smembers(key) - before == expected, "the worker stored exactly the router's hashes"
    await client.aclose()


async def test_router_tokenizes_like_the_worker(
    fleet: Fleet, make_router: Any, router_tiny_model: Path
) -> None:
    from transformers import AutoTokenizer

    from gpu_worker.engine.processor import InputProcessor
    from llmserve.prompt_input import ChatPrompt

    router = await make_router("prefix")
    worker_side = InputProcessor(AutoTokenizer.from_pretrained(router_tiny_model), 49152, 512, frozenset({2}))
    prompts = ["Hello world", "  leading spaces and trailing\n", "Ünïcödé — 日本語テキスト 🙂", "a\n\nb\tc"]
    chats = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"}],
    ]
    _, workers = await router.router.resolve("beta")
    tok = await router.router.tokenizers.get("beta", workers)
    for prompt in prompts:
        assert tok.encode_prompt(prompt) == list(worker_side.tokenize(prompt)[1]), prompt
    for chat in chats:
        for add in (True, False):
            chat_prompt = ChatPrompt(chat, add)
            assert tok.encode_chat(chat_prompt) == list(worker_side.tokenize(chat_prompt)[1])
    # End to end: router (token ids forwarded) and worker (text) generate the same greedy tokens.
    sampling = gen_pb.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    msgs = gen_pb.ChatMessages(messages=[gen_pb.ChatMessage(role=m["role"], content=m["content"])
                                         for m in chats[1]])
    for kwargs in ({"prompt": prompts[2]}, {"messages": msgs}):
        via_router, _ = await generate(router.target, model="beta", sampling=sampling, **kwargs)
        direct, _ = await generate(fleet.beta.address, model="beta", sampling=sampling, **kwargs)
        assert [t for c in via_router for t in c.token_ids] == [t for c in direct for t in c.token_ids]
        assert via_router[-1].usage.prompt_tokens == direct[-1].usage.prompt_tokens


async def test_client_cancel_and_deadline_reach_the_worker(fleet: Fleet, make_router: Any) -> None:
    router = await make_router("prefix")
    long = gen_pb.SamplingParams(max_tokens=450, temperature=0.0, ignore_eos=True)

    async def beta_running() -> int:
        async with grpc.aio.insecure_channel(fleet.beta.address) as ch:
            info = await int_grpc.WorkerControlStub(ch).GetWorkerInfo(int_pb.GetWorkerInfoRequest())
        return int(info.load.num_running + info.load.num_waiting)

    async def beta_idle() -> bool:
        return await beta_running() == 0

    async with grpc.aio.insecure_channel(router.target) as channel:
        call = gen_grpc.GenerationStub(channel).Generate(
            gen_pb.GenerateRequest(model="beta", prompt=text("cancel", 30), sampling=long))
        assert (await call.read()).token_ids
        assert await beta_running() == 1
        call.cancel()
    await wait_until(beta_idle, timeout_s=10)  # the worker aborted the request and freed its slot

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(router.target, model="beta", prompt=text("deadline", 30), sampling=long, timeout_s=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until(beta_idle, timeout_s=10)
