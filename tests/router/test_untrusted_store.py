"""The router never trusts the state store (issue 17, findings 3, 4 and 7).

A real worker and a real router (both in this process, plaintext on loopback, one fleet secret)
share a real redis-server; the tests write into Redis what a broken or hostile writer could:
malformed records (``block_size: 0``, ``"load": "oops"``, non-JSON bytes), and hand-written
records with no expiry pointing at a fake server of their own (stale, unsigned, badly signed).
Requests keep being served by the real worker only, ListModels answers, every bad record is
counted. Last, Redis restarts without persistence: the epoch changes and the router rebuilds.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gpu_worker.server import WorkerServer
from llmserve.fleet import LoadReport, WorkerRecord
from llmserve.fleet.redis_store import RedisStateStore
from llmserve.security.records import FleetSecret
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from router.security import RouterSecurityConfig
from router.server import RouterServer
from tests.router.inprocess import start_router, start_worker
from tests.router.router_procs import RedisProc, generate, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "sigma"
SECRET = "fleet-secret-" + "x" * 32


class FakeWorker(gen_grpc.GenerationServicer):
    """What an attacker runs: a Generation server that answers every prompt with its own text."""

    def __init__(self) -> None:
        self.calls = 0

    async def Generate(self, request: gen_pb.GenerateRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> AsyncIterator[gen_pb.GenerateResponse]:
        self.calls += 1
        yield gen_pb.GenerateResponse(text="PWNED", token_ids=[1], finish_reason="stop", worker_id="fake")


@dataclass
class Fleet:
    worker: WorkerServer
    router: RouterServer
    redis: aioredis.Redis
    fake: FakeWorker
    fake_address: str

    def invalid(self, reason: str) -> float:
        value = self.router.metrics.registry.get_sample_value(
            "llmserve:router_invalid_worker_records_total", {"reason": reason})
        return value or 0.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(module_redis: RedisProc, router_tiny_model: Path,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    secret_file = tmp_path_factory.mktemp("secret") / "fleet.secret"
    secret_file.write_text(SECRET + "\n")
    worker = await start_worker(router_tiny_model, MODEL, module_redis.url,
                                fleet_secret_file=str(secret_file))
    store = RedisStateStore(module_redis.url)
    router = await start_router(store, policy="round-robin",
                                security=RouterSecurityConfig(fleet_secret_file=str(secret_file)))
    fake_server = grpc.aio.server()
    fake = FakeWorker()
    gen_grpc.add_GenerationServicer_to_server(fake, fake_server)
    fake_port = fake_server.add_insecure_port("127.0.0.1:0")
    await fake_server.start()
    client = aioredis.Redis.from_url(module_redis.url)
    try:
        yield Fleet(worker, router, client, fake, f"127.0.0.1:{fake_port}")
    finally:
        await client.aclose()
        await router.stop(grace_s=0.5)
        await store.close()
        await worker.drain(0.5)
        await fake_server.stop(None)


async def plant(r: aioredis.Redis, worker_id: str, value: bytes | str, model: str = MODEL) -> None:
    """Write a record the way a hostile or broken writer would: no TTL at all."""
    await r.set(f"llmserve:worker:{worker_id}", value)
    await r.sadd("llmserve:workers", worker_id)
    await r.sadd("llmserve:models", model)


async def serve_requests(fleet: Fleet, n: int = 8) -> set[str]:
    """``n`` requests through the router; the ids of the workers that served them."""
    served = set()
    for i in range(n):
        chunks, worker_id = await generate(fleet.router.target, model=MODEL, prompt=f"hello {i}")
        assert "PWNED" not in "".join(c.text for c in chunks)
        served.add(worker_id)
    return served


async def list_models(target: str) -> list[str]:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await gen_grpc.GenerationStub(channel).ListModels(gen_pb.ListModelsRequest(), timeout=10)
    return [m.name for m in reply.models]


def record_fields(worker_id: str, address: str, **overrides: Any) -> dict[str, Any]:
    fields = WorkerRecord(worker_id, MODEL, address, 16, 512, LoadReport(max_num_seqs=8, max_queue_len=8),
                          heartbeat_at=time.time()).fields()
    fields.update(overrides)
    return fields


async def test_malformed_records_are_skipped_counted_and_never_an_error(fleet: Fleet) -> None:
    """Finding 3: one bad record made every request INTERNAL and ListModels fail."""
    real = fleet.worker.service.worker_id
    await plant(fleet.redis, "zero-block", json.dumps(record_fields("zero-block", fleet.fake_address,
                                                                    block_size=0)))
    await plant(fleet.redis, "oops-load", json.dumps(record_fields("oops-load", fleet.fake_address,
                                                                   load="oops")))
    await plant(fleet.redis, "garbage", b"\x00\xffnot json at all{")
    await plant(fleet.redis, "\xff-bad-id", b"{}")
    assert await serve_requests(fleet) == {real}
    assert await list_models(fleet.router.target) == [MODEL]
    assert fleet.invalid("out_of_range") >= 1 and fleet.invalid("schema") >= 1
    assert fleet.invalid("not_json") >= 1
    assert fleet.fake.calls == 0
    for wid in ("zero-block", "oops-load", "garbage", "\xff-bad-id"):
        await fleet.redis.delete(f"llmserve:worker:{wid}")
        await fleet.redis.srem("llmserve:workers", wid)


async def test_records_a_worker_did_not_sign_now_get_no_traffic(fleet: Fleet) -> None:
    """Finding 4: a hand-written record with no expiry pointing at a fake server got users'
    prompts. Stale (validly signed, but its heartbeat is old), unsigned, or signed with another
    secret: none of them is routed to."""
    real = fleet.worker.service.worker_id
    secret = FleetSecret([SECRET.encode()])
    stale = record_fields("fake-stale", fleet.fake_address, heartbeat_at=time.time() - 3600)
    stale["sig"] = secret.sign(stale)
    unsigned = record_fields("fake-unsigned", fleet.fake_address)
    forged = record_fields("fake-forged", fleet.fake_address)
    forged["sig"] = FleetSecret([b"guessed-secret-" + b"y" * 32]).sign(forged)
    for record in (stale, unsigned, forged):
        await plant(fleet.redis, record["worker_id"], json.dumps(record))
    before = {r: fleet.invalid(r) for r in ("stale", "unsigned", "bad_signature")}
    assert await serve_requests(fleet) == {real}  # round-robin: the fakes would have had their turns
    assert fleet.fake.calls == 0
    for reason, count in before.items():
        assert fleet.invalid(reason) > count, reason
    snapshot = await fleet.router.registry.snapshot()
    assert [w.worker_id for w in snapshot.workers] == [real]
    for record in (stale, unsigned, forged):
        await fleet.redis.delete(f"llmserve:worker:{record['worker_id']}")
        await fleet.redis.srem("llmserve:workers", record["worker_id"])


async def test_the_number_of_workers_considered_per_model_is_bounded(fleet: Fleet,
                                                                    module_redis: RedisProc) -> None:
    router = await start_router(RedisStateStore(module_redis.url), policy="round-robin",
                                security=RouterSecurityConfig(max_workers_per_model=1))
    try:
        for i in range(5):  # unsigned is fine here: this router has no fleet secret
            await plant(fleet.redis, f"aaa-{i}", json.dumps(record_fields(f"aaa-{i}", fleet.fake_address)))
        snapshot = await router.registry.refresh()
        assert [w.worker_id for w in snapshot.workers] == ["aaa-0"]
        assert sum(r.count for r in snapshot.rejected if r.reason == "over_limit") == 5
    finally:
        await router.stop(grace_s=0.1)
        for i in range(5):
            await fleet.redis.delete(f"llmserve:worker:aaa-{i}")
            await fleet.redis.srem("llmserve:workers", f"aaa-{i}")


async def test_a_redis_restart_without_persistence_changes_the_epoch_and_routers_rebuild(
    fleet: Fleet, module_redis: RedisProc
) -> None:
    """Finding 7: each worker re-wrote its own epoch token after a restart, so "the store lost
    its data" never fired. Now the first heartbeat after the loss writes a new random epoch."""
    real = fleet.worker.service.worker_id
    registry = fleet.router.registry
    await registry.refresh()
    epoch, changes = registry.epoch, registry.epoch_changes
    assert epoch is not None
    module_redis.restart()  # no persistence: empty

    async def re_registered() -> bool:
        snap = await registry.refresh()
        return not snap.stale and real in {w.worker_id for w in snap.workers}

    await wait_until(re_registered, timeout_s=30)
    assert registry.epoch not in (None, epoch)
    assert registry.epoch_changes == changes + 1
    resets = fleet.router.metrics.registry.get_sample_value("llmserve:router_fleet_store_resets_total")
    assert resets is not None and resets >= 1
    assert await serve_requests(fleet, 2) == {real}
