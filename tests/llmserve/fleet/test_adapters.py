"""LoRA adapters in the fleet state: records carry them through both stores, the store's models
set learns their names, and a snapshot routes an adapter's name to the workers that have it."""

from __future__ import annotations

import json
import time

from llmserve.fleet import (
    LoadReport,
    MemoryStateStore,
    PublisherTiming,
    Registry,
    StateStore,
    WorkerIdentity,
    WorkerPublisher,
    WorkerRecord,
)
from llmserve.fleet.registry import FleetSnapshot


def rec(wid: str, model: str = "base", adapters: tuple[str, ...] = (), *, draining: bool = False,
        standby: bool = False) -> WorkerRecord:
    return WorkerRecord(wid, model, "127.0.0.1:1", 16, 2048, LoadReport(max_num_seqs=8), draining=draining,
                        heartbeat_at=time.time(), standby=standby, adapters=adapters)


def ids(workers: list[WorkerRecord]) -> list[str]:
    return [w.worker_id for w in workers]


def test_adapters_are_stored_only_when_some() -> None:
    plain = json.loads(rec("w1").to_json())
    assert "adapters" not in plain  # a record without adapters is byte for byte what it was
    with_adapters = json.loads(rec("w1", adapters=("sql-lora", "chat-lora")).to_json())
    assert with_adapters["adapters"] == ["sql-lora", "chat-lora"]
    assert WorkerRecord.from_json(rec("w1", adapters=("sql-lora",)).to_json()).adapters == ("sql-lora",)


async def test_records_with_adapters_round_trip_and_register_their_names(store: StateStore) -> None:
    lora = rec("w1", adapters=("sql-lora", "chat-lora"))
    await store.heartbeat(lora, ttl_s=5)
    await store.heartbeat(rec("w2", "other"), ttl_s=5)
    view = await store.read_fleet()
    assert view.rejected == ()
    assert view.workers[0] == lora
    assert view.workers[0].adapters == ("sql-lora", "chat-lora")  # a tuple again, in order
    assert view.workers[1].adapters == ()
    assert view.models == {"base", "sql-lora", "chat-lora", "other"}


async def test_an_adapter_is_remembered_after_its_worker_is_gone(store: StateStore) -> None:
    await store.heartbeat(rec("w1", adapters=("sql-lora",)), ttl_s=5)
    await store.remove_worker("w1")
    snap = await Registry(store).snapshot()
    assert snap.workers_of("sql-lora") == [] and "sql-lora" in snap.models  # UNAVAILABLE, not NOT_FOUND


async def test_an_unloaded_adapter_is_forgotten_unless_a_worker_still_has_it(store: StateStore) -> None:
    registry = Registry(store, cache_s=0.0)
    await store.heartbeat(rec("w1", adapters=("sql-lora", "chat-lora")), ttl_s=5)
    await store.heartbeat(rec("w2", adapters=("chat-lora",)), ttl_s=5)
    assert {"sql-lora", "chat-lora"} <= (await registry.snapshot()).models
    await store.heartbeat(rec("w1"), ttl_s=5)  # w1 unloaded both; w2 still has chat-lora
    for name in ("sql-lora", "chat-lora"):
        await registry.forget_model(name)
    snap = await registry.snapshot()
    assert "sql-lora" not in snap.models and "sql-lora" not in (await store.read_fleet()).models
    assert "chat-lora" in snap.models and ids(snap.workers_of("chat-lora")) == ["w2"]  # re-learned
    assert "base" in snap.models


async def test_the_publisher_republishes_when_its_adapters_change() -> None:
    store = MemoryStateStore()

    async def no_hashes() -> list[bytes]:
        return []

    publisher = WorkerPublisher(store, WorkerIdentity("w1", "base", "127.0.0.1:1", 16, 2048),
                                load_fn=LoadReport, kv_events_fn=list, cached_hashes_fn=no_hashes,
                                timing=PublisherTiming(heartbeat_interval_s=60, ttl_s=300))
    assert await publisher.publish_once()
    await publisher.set_adapters(("sql-lora",))  # at once, not at the next heartbeat a minute later
    [record] = (await store.read_fleet()).workers
    assert record.adapters == ("sql-lora",) and publisher.identity.adapters == ("sql-lora",)


async def test_the_publisher_copies_its_adapters_into_every_record() -> None:
    store = MemoryStateStore()

    async def no_hashes() -> list[bytes]:
        return []

    publisher = WorkerPublisher(
        store, WorkerIdentity("w1", "base", "127.0.0.1:1", 16, 2048, adapters=("sql-lora",)),
        load_fn=LoadReport, kv_events_fn=list, cached_hashes_fn=no_hashes, timing=PublisherTiming())
    assert publisher.record().adapters == ("sql-lora",)
    assert await publisher.publish_once()
    await publisher.drain()
    [record] = (await store.read_fleet()).workers
    assert record.adapters == ("sql-lora",) and record.draining


def test_workers_of_an_adapter_are_those_that_have_it() -> None:
    snap = FleetSnapshot(workers=(
        rec("w1", adapters=("sql-lora", "chat-lora")),
        rec("w2"),
        rec("w3", adapters=("sql-lora",)),
        rec("w4", adapters=("sql-lora",), draining=True),
        rec("w5", adapters=("sql-lora",), standby=True),
        rec("w6", "other", adapters=("other-lora",)),
    ), models=frozenset())
    assert ids(snap.workers_of("base")) == ["w1", "w2", "w3"]
    assert ids(snap.workers_of("sql-lora")) == ["w1", "w3"]  # neither draining nor standby
    assert ids(snap.workers_of("chat-lora")) == ["w1"]
    assert snap.workers_of("nope") == []
    live = {name: ids(ws) for name, ws in snap.live_models().items()}
    assert live == {"base": ["w1", "w2", "w3"], "sql-lora": ["w1", "w3"], "chat-lora": ["w1"],
                    "other": ["w6"], "other-lora": ["w6"]}
    assert snap.standby_counts() == {"base": 1, "sql-lora": 1}
    assert [snap.parent_of(n) for n in ("sql-lora", "chat-lora", "other-lora", "base", "other", "nope")] == [
        "base", "base", "other", "", "", ""]


def test_parent_of_is_the_same_on_every_router_when_workers_disagree() -> None:
    snap = FleetSnapshot(workers=(rec("w1", "zeta", ("x-lora",)), rec("w2", "alpha", ("x-lora",))),
                         models=frozenset())
    assert snap.parent_of("x-lora") == "alpha"
    served_as_base = FleetSnapshot(workers=(rec("w1", "x"), rec("w2", "y", ("x",))), models=frozenset())
    assert served_as_base.parent_of("x") == ""  # some worker serves it as its model
