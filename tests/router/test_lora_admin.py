"""Runtime LoRA loading through a real router's HTTP door (vLLM's ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``): the load reaches every worker of the base model and is all or
nothing (a refusal rolls the others back), the unload reaches the workers that list the adapter,
only admin keys may do either, and without ``--allow-lora-updates`` the endpoints do not exist.

Stand-in workers (gRPC WorkerControl servers on loopback) keep their adapters and republish
their record in a MemoryStateStore as a worker does; one can be told to refuse.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest_asyncio

from llmserve.fleet import LoadReport, MemoryStateStore, WorkerRecord
from llmserve.security.api_keys import hash_key
from llmserve.v1 import internal_pb2 as int_pb
from llmserve.v1 import internal_pb2_grpc as int_grpc
from router.access import AccessConfig
from router.security import RouterSecurityConfig
from router.server import RouterServer
from tests.router.frontends.stack_proc import http_json
from tests.router.inprocess import start_router

BASE, OTHER = "base-model", "other-model"
ADMIN_KEY, USER_KEY = "llms-admin-key", "llms-user-key"


class StandInControl(int_grpc.WorkerControlServicer):
    """A worker's LoRA control: loads unless told to refuse, republishing its record."""

    def __init__(self, store: MemoryStateStore, record: WorkerRecord) -> None:
        self.store = store
        self.record = record
        self.calls: list[tuple[str, str]] = []  # (rpc, lora_name)
        self.refuse_loads: tuple[grpc.StatusCode, str] | None = None

    async def publish(self) -> None:
        await self.store.heartbeat(replace(self.record, heartbeat_at=time.time()), ttl_s=60)

    async def LoadLoraAdapter(self, request: int_pb.LoadLoraAdapterRequest,  # noqa: N802
                              context: grpc.aio.ServicerContext) -> int_pb.LoraAdapters:
        self.calls.append(("load", request.lora_name))
        if self.refuse_loads is not None:
            await context.abort(*self.refuse_loads)
        if request.lora_name in self.record.adapters:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{request.lora_name!r} is already loaded")
        self.record = replace(self.record, adapters=(*self.record.adapters, request.lora_name))
        await self.publish()
        return int_pb.LoraAdapters(adapters=self.record.adapters)

    async def UnloadLoraAdapter(self, request: int_pb.UnloadLoraAdapterRequest,  # noqa: N802
                                context: grpc.aio.ServicerContext) -> int_pb.LoraAdapters:
        self.calls.append(("unload", request.lora_name))
        if request.lora_name not in self.record.adapters:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{request.lora_name!r} is not loaded")
        self.record = replace(self.record, adapters=tuple(a for a in self.record.adapters
                                                          if a != request.lora_name))
        await self.publish()
        return int_pb.LoraAdapters(adapters=self.record.adapters)


@dataclass
class Fleet:
    store: MemoryStateStore
    router: RouterServer
    workers: dict[str, StandInControl]

    async def post(self, route: str, body: dict[str, Any], key: str | None = ADMIN_KEY) -> tuple[int, Any]:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return await asyncio.to_thread(http_json, "POST", f"http://127.0.0.1:{self.router.http_port}{route}",
                                       body, headers)

    async def models(self) -> dict[str, Any]:
        _, body = await asyncio.to_thread(http_json, "GET", f"http://127.0.0.1:{self.router.http_port}/v1/models",
                                          None, {"authorization": f"Bearer {ADMIN_KEY}"})
        return {m["id"]: m["parent"] for m in body["data"]}


@pytest_asyncio.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    keys = tmp_path / "keys"
    keys.write_text(f"{hash_key(ADMIN_KEY)} ops admin\n{hash_key(USER_KEY)} alice\n")
    store = MemoryStateStore()
    servers, workers = [], {}
    for wid, model in (("w1", BASE), ("w2", BASE), ("w3", OTHER)):
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        record = WorkerRecord(wid, model, f"127.0.0.1:{port}", 16, 512,
                              LoadReport(max_num_seqs=8, max_queue_len=8, num_kv_blocks=32),
                              heartbeat_at=time.time())
        workers[wid] = StandInControl(store, record)
        int_grpc.add_WorkerControlServicer_to_server(workers[wid], server)
        await server.start()
        servers.append(server)
        await workers[wid].publish()
    security = RouterSecurityConfig(access=AccessConfig(api_keys_file=str(keys)))
    router = await start_router(store, http_port=0, allow_lora_updates=True, security=security)
    try:
        yield Fleet(store, router, workers)
    finally:
        await router.stop(grace_s=0.5)
        for server in servers:
            await server.stop(None)


LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


async def test_a_load_reaches_every_worker_of_the_base_model_and_an_unload_every_holder(fleet: Fleet) -> None:
    status, body = await fleet.post(LOAD, {"lora_name": "sql", "lora_path": "/adapters/sql", "model": BASE})
    assert (status, body) == (200, "Success: LoRA adapter 'sql' added successfully.")
    assert fleet.workers["w1"].calls == fleet.workers["w2"].calls == [("load", "sql")]
    assert fleet.workers["w3"].calls == []  # another base model
    assert (await fleet.models())["sql"] == BASE  # this router routes it at once
    status, body = await fleet.post(LOAD, {"lora_name": "sql", "lora_path": "/adapters/sql", "model": BASE})
    assert status == 400 and "already loaded" in body["error"]["message"]
    status, body = await fleet.post(UNLOAD, {"lora_name": "sql"})
    assert (status, body) == (200, "Success: LoRA adapter 'sql' removed successfully.")
    assert fleet.workers["w1"].calls[-1] == fleet.workers["w2"].calls[-1] == ("unload", "sql")
    assert "sql" not in await fleet.models()
    status, body = await fleet.post(UNLOAD, {"lora_name": "sql"})
    assert status == 404 and "not loaded on any worker" in body["error"]["message"]


async def test_a_refused_load_is_rolled_back_on_the_workers_that_took_it(fleet: Fleet) -> None:
    fleet.workers["w2"].refuse_loads = (grpc.StatusCode.RESOURCE_EXHAUSTED, "every LoRA slot is taken")
    status, body = await fleet.post(LOAD, {"lora_name": "sql", "lora_path": "/adapters/sql", "model": BASE})
    assert status == 429
    assert "worker w2 refused: every LoRA slot is taken" in body["error"]["message"]
    assert fleet.workers["w1"].calls == [("load", "sql"), ("unload", "sql")]
    assert fleet.workers["w1"].record.adapters == ()
    assert "sql" not in await fleet.models()
    fleet.workers["w2"].refuse_loads = (grpc.StatusCode.INVALID_ARGUMENT, "path not under --lora-root")
    status, body = await fleet.post(LOAD, {"lora_name": "sql", "lora_path": "/etc", "model": BASE})
    assert status == 400 and "not under --lora-root" in body["error"]["message"]


async def test_the_base_model_is_named_when_the_fleet_serves_several(fleet: Fleet) -> None:
    status, body = await fleet.post(LOAD, {"lora_name": "sql", "lora_path": "/adapters/sql"})
    assert status == 400 and body["error"]["param"] == "model"
    status, body = await fleet.post(LOAD, {"lora_name": "sql", "lora_path": "/a", "model": "nope"})
    assert status == 404
    status, body = await fleet.post(LOAD, {"lora_name": "sql", "lora_path": "/a", "model": BASE,
                                           "load_inplace": True})
    assert status == 400 and body["error"]["param"] == "load_inplace"
    status, body = await fleet.post(LOAD, {"lora_name": "", "lora_path": "/a", "model": BASE})
    assert status == 400 and body["error"]["param"] == "lora_name"
    assert all(w.calls == [] for w in fleet.workers.values())


async def test_only_admin_keys_manage_adapters(fleet: Fleet) -> None:
    body = {"lora_name": "sql", "lora_path": "/adapters/sql", "model": BASE}
    status, reply = await fleet.post(LOAD, body, key=USER_KEY)
    assert status == 403 and "admin" in reply["error"]["message"]
    assert (await fleet.post(LOAD, body, key=None))[0] == 401
    assert (await fleet.post(UNLOAD, {"lora_name": "sql"}, key=USER_KEY))[0] == 403
    assert all(w.calls == [] for w in fleet.workers.values())


async def test_without_the_flag_the_endpoints_do_not_exist() -> None:
    router = await start_router(MemoryStateStore(), http_port=0)
    try:
        status, _ = await asyncio.to_thread(http_json, "POST", f"http://127.0.0.1:{router.http_port}{LOAD}",
                                            {"lora_name": "sql", "lora_path": "/a"})
        assert status == 404
    finally:
        await router.stop(grace_s=0.5)
