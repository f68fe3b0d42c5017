"""LoRA adapters through a real router: an adapter's name is routed to the workers that have it,
and every door lists it with its base model.

Two stand-in workers (gRPC Generation servers that record what they get) are registered in a
MemoryStateStore by hand: "w-base" serves the base model only, "w-lora" serves it and the
adapter "sql-lora". Prompts are token ids, so no tokenizer is needed.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llmserve.fleet import LoadReport, MemoryStateStore, Registry, WorkerRecord
from llmserve.hashing import block_hashes
from llmserve.kserve import grpc_service_pb2 as kserve_pb
from llmserve.kserve import grpc_service_pb2_grpc as kserve_grpc
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from router.dispatch import InflightTracker
from router.policy import make_policy
from router.routing import Router
from router.server import RouterServer
from router.tokenizers import TokenizerCache
from tests.router.inprocess import start_router
from tests.router.router_procs import generate

BASE = "base-model"
ADAPTER = "sql-lora"


class StandIn(gen_grpc.GenerationServicer):
    """A worker's Generation service that answers one token and records each request's model."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.models: list[str] = []

    async def Generate(self, request: gen_pb.GenerateRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> AsyncIterator[gen_pb.GenerateResponse]:
        self.models.append(request.model)
        usage = gen_pb.Usage(prompt_tokens=len(request.prompt_token_ids.ids), completion_tokens=1)
        yield gen_pb.GenerateResponse(token_ids=[7], text="x", finish_reason="length",
                                      worker_id=self.worker_id, usage=usage)


@dataclass
class Fleet:
    store: MemoryStateStore
    router: RouterServer
    workers: dict[str, StandIn]
    records: dict[str, WorkerRecord]

    async def heartbeat(self) -> None:
        for record in self.records.values():
            await self.store.heartbeat(record, ttl_s=60)


@pytest_asyncio.fixture
async def fleet() -> AsyncIterator[Fleet]:
    servers, workers, records = [], {}, {}
    for wid, adapters in (("w-base", ()), ("w-lora", (ADAPTER,))):
        server = grpc.aio.server()
        workers[wid] = StandIn(wid)
        gen_grpc.add_GenerationServicer_to_server(workers[wid], server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        records[wid] = WorkerRecord(wid, BASE, f"127.0.0.1:{port}", 16, 512,
                                    LoadReport(max_num_seqs=8, max_queue_len=8, num_kv_blocks=32),
                                    heartbeat_at=time.time(), adapters=adapters)
    store = MemoryStateStore()
    router = await start_router(store, policy="prefix", http_port=0)
    fleet = Fleet(store, router, workers, records)
    await fleet.heartbeat()
    try:
        yield fleet
    finally:
        await router.stop(grace_s=0.5)
        for server in servers:
            await server.stop(None)


async def routed_to(fleet: Fleet, model: str, n: int = 6) -> set[str]:
    served = set()
    for i in range(n):
        _, worker_id = await generate(fleet.router.target, model=model,
                                      prompt_token_ids=gen_pb.TokenIds(ids=[i + 1] * 40))
        served.add(worker_id)
    return served


async def test_an_adapter_is_routed_only_to_the_workers_that_have_it(fleet: Fleet) -> None:
    assert await routed_to(fleet, ADAPTER) == {"w-lora"}
    assert fleet.workers["w-lora"].models == [ADAPTER] * 6  # the worker is asked for the adapter
    assert fleet.workers["w-base"].models == []
    await routed_to(fleet, BASE, n=12)
    assert set(fleet.workers["w-base"].models) == {BASE}


async def test_unknown_names_are_not_found_and_a_gone_adapter_is_unavailable(fleet: Fleet) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await routed_to(fleet, "nope-lora", n=1)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await fleet.store.remove_worker("w-lora")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await routed_to(fleet, ADAPTER, n=1)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # served once: its worker may come back
    assert await routed_to(fleet, BASE, n=2) == {"w-base"}


async def test_no_model_name_means_the_one_base_model_not_its_adapter(fleet: Fleet) -> None:
    await routed_to(fleet, "", n=4)
    assert [m for w in fleet.workers.values() for m in w.models] == [BASE] * 4


async def test_prefix_lookups_are_seeded_with_the_adapter_name(fleet: Fleet) -> None:
    """The worker seeds an adapter request's block hashes with the adapter's name: its cached
    blocks match requests for the adapter, never the base model's (their K/V differ)."""
    tokens = list(range(1, 65))
    await fleet.store.replace_kv("w-lora", block_hashes(tokens, 16, seed=ADAPTER), ttl_s=60)
    router = Router(Registry(fleet.store, cache_s=0.0), TokenizerCache(_no_tokenizer), make_policy("prefix"),
                    InflightTracker())
    _, workers = await router.resolve(ADAPTER)
    ranked = await router.rank(ADAPTER, workers, tokens, "r1")
    assert ranked.reason == "prefix_hit" and ranked.workers[0].worker_id == "w-lora"
    _, workers = await router.resolve(BASE)
    assert (await router.rank(BASE, workers, tokens, "r2")).reason != "prefix_hit"


async def _no_tokenizer(worker: WorkerRecord) -> dict[str, bytes]:
    raise AssertionError("token ids need no tokenizer")


async def test_list_models_shows_the_adapter_with_its_parent(fleet: Fleet) -> None:
    async with grpc.aio.insecure_channel(fleet.router.target) as channel:
        reply = await gen_grpc.GenerationStub(channel).ListModels(gen_pb.ListModelsRequest(), timeout=10)
        ready = await kserve_grpc.GRPCInferenceServiceStub(channel).ModelReady(
            kserve_pb.ModelReadyRequest(name=ADAPTER), timeout=10)
        metadata = await kserve_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            kserve_pb.ModelMetadataRequest(name=ADAPTER), timeout=10)
    assert [(m.name, m.parent, m.num_workers) for m in reply.models] == [(BASE, "", 2), (ADAPTER, BASE, 1)]
    assert reply.models[1].kv_cache_tokens == 32 * 16 and reply.models[1].max_model_len == 512
    assert ready.ready and metadata.name == ADAPTER  # the KServe door lists it as a model


async def test_openai_models_carry_vllm_parent_and_root(fleet: Fleet) -> None:
    port = fleet.router.http_port

    def get(path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:  # noqa: S310
            return json.loads(reply.read())

    listed = await asyncio.to_thread(get, "/v1/models")
    cards = {card["id"]: card for card in listed["data"]}
    assert (cards[BASE]["root"], cards[BASE]["parent"]) == (BASE, None)
    assert (cards[ADAPTER]["root"], cards[ADAPTER]["parent"]) == (ADAPTER, BASE)
    assert await asyncio.to_thread(get, f"/v1/models/{ADAPTER}") == cards[ADAPTER]
