"""Warm standby in the fleet state: the record's ``standby`` field (validated, signed), routers'
views without standbys, and when standbys promote themselves (StandbyWatcher) against real
stores: on lost capacity (a worker gone, stale or reported lost), on a sustained queue, and
never more of them than needed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from llmserve.fleet import (
    FleetSnapshot,
    LoadReport,
    MemoryStateStore,
    PublisherTiming,
    StateStore,
    WorkerIdentity,
    WorkerPublisher,
    WorkerRecord,
)
from llmserve.fleet.redis_store import RedisStateStore
from llmserve.fleet.standby import CAPACITY, QUEUE, StandbyPolicy, StandbyWatcher, standby_order
from llmserve.security.records import FleetSecret, RecordReader, RecordRejected

FAST = PublisherTiming(heartbeat_interval_s=0.1, ttl_s=1.0, kv_flush_interval_s=0.02)
MODEL = "m"


def publisher(store: StateStore, wid: str, *, standby: bool = False, waiting: int = 0,
              model: str = MODEL) -> WorkerPublisher:
    async def no_hashes() -> set[bytes]:
        return set()

    return WorkerPublisher(
        store, WorkerIdentity(wid, model, "127.0.0.1:1", 16, 2048),
        load_fn=lambda: LoadReport(num_waiting=waiting, max_num_seqs=8, max_queue_len=64),
        kv_events_fn=list, cached_hashes_fn=no_hashes, timing=FAST, standby=standby,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def recorder(promoted: list[tuple[str, str]], wid: str,
             then: Callable[[], Awaitable[object]] | None = None) -> Callable[[str], Awaitable[None]]:
    async def promote(reason: str) -> None:
        promoted.append((wid, reason))
        if then is not None:
            await then()

    return promote


# -- the record ------------------------------------------------------------------------------------

def test_standby_field_round_trips_and_is_stored_only_when_set() -> None:
    live = WorkerRecord("w1", MODEL, "127.0.0.1:5", 16, 2048, heartbeat_at=1.0)
    assert "standby" not in json.loads(live.to_json())  # a live record is what it always was
    standby = replace(live, standby=True)
    assert json.loads(standby.to_json())["standby"] is True
    assert WorkerRecord.from_json(standby.to_json()) == standby
    assert WorkerRecord.from_json(live.to_json()).standby is False
    bad = {**json.loads(live.to_json()), "standby": "yes"}
    with pytest.raises(RecordRejected) as err:
        WorkerRecord.from_json(json.dumps(bad))
    assert err.value.reason == "schema"


def test_the_signature_covers_the_standby_flag() -> None:
    secret = FleetSecret([b"s" * 32])
    record = WorkerRecord("w1", MODEL, "127.0.0.1:5", 16, 2048, heartbeat_at=time.time(), standby=True)
    signed = replace(record, sig=secret.sign(record.fields()))
    reader = RecordReader(secret=secret)
    assert reader.read("w1", signed.to_json()).standby
    forged = {**json.loads(signed.to_json())}
    del forged["standby"]  # a Redis writer turns the standby into a live worker
    with pytest.raises(RecordRejected) as err:
        reader.read("w1", json.dumps(forged))
    assert err.value.reason == "bad_signature"


def test_routers_never_see_standbys_as_candidates() -> None:
    workers = (WorkerRecord("a", MODEL, "h:1", 16, 64), WorkerRecord("b", MODEL, "h:2", 16, 64, standby=True),
               WorkerRecord("c", "other", "h:3", 16, 64, standby=True),
               WorkerRecord("d", MODEL, "h:4", 16, 64, standby=True, draining=True))
    snap = FleetSnapshot(workers, frozenset({MODEL, "other"}))
    assert [w.worker_id for w in snap.workers_of(MODEL)] == ["a"]
    assert snap.workers_of("other") == []
    assert {m: [w.worker_id for w in ws] for m, ws in snap.live_models().items()} == {MODEL: ["a"]}
    assert snap.standby_counts() == {MODEL: 1, "other": 1}


# -- when a standby promotes ------------------------------------------------------------------------

async def test_a_deregistered_worker_is_replaced_by_exactly_one_standby(store: StateStore) -> None:
    live = publisher(store, "live")
    standbys = [publisher(store, f"sb-{i}", standby=True) for i in range(3)]
    for p in (live, *standbys):
        await p.publish_once()
    promoted: list[tuple[str, str]] = []
    watchers = [StandbyWatcher(store, p.identity.worker_id, MODEL, StandbyPolicy(), recorder(
        promoted, p.identity.worker_id, p.promote)) for p in standbys]
    assert [await w.check_once() for w in watchers] == [None, None, None]  # one live worker: enough
    await live.deregister()
    for w in watchers:
        await w.check_once()
    order = standby_order((await store.read_fleet()).workers, MODEL)  # the two left standing
    first = promoted[0][0]
    assert promoted == [(first, CAPACITY)] and first not in order and len(order) == 2
    view = await store.read_fleet()
    assert [w.worker_id for w in view.workers if not w.standby] == [first]


async def test_standbys_agreeing_on_a_view_promote_only_as_many_as_needed() -> None:
    # Every standby reads the store before any of them promotes (their promotion is only
    # recorded here): the ranking alone keeps them from stampeding.
    store = MemoryStateStore()
    for i in range(4):
        await publisher(store, f"sb-{i}", standby=True).publish_once()
    await publisher(store, "live").publish_once()
    promoted: list[tuple[str, str]] = []
    policy = StandbyPolicy(min_live=3, startup_grace_s=0)  # 1 live, 3 wanted: 2 must promote
    for i in range(4):
        await StandbyWatcher(store, f"sb-{i}", MODEL, policy, recorder(promoted, f"sb-{i}")).check_once()
    expected = standby_order((await store.read_fleet()).workers, MODEL)[:2]
    assert sorted(promoted) == sorted((wid, CAPACITY) for wid in expected)


async def test_at_start_up_a_standby_waits_for_the_live_workers_still_loading() -> None:
    # A standby that loaded before the fleet's live workers must not take their place: a deficit
    # it never saw arise counts only after startup_grace_s.
    store = MemoryStateStore()
    await publisher(store, "sb", standby=True).publish_once()
    clock = Clock()
    promoted: list[tuple[str, str]] = []
    watcher = StandbyWatcher(store, "sb", MODEL, StandbyPolicy(startup_grace_s=30), recorder(promoted, "sb"),
                             clock=clock)
    assert await watcher.check_once() is None  # no live worker yet: still within the grace
    clock.now = 10.0
    live = publisher(store, "live")
    await live.publish_once()  # the live worker finished loading
    assert await watcher.check_once() is None
    clock.now = 40.0
    assert await watcher.check_once() is None  # past the grace, but capacity is there
    await live.deregister()
    assert await watcher.check_once() == CAPACITY  # seen to drop: at once
    late = StandbyWatcher(store, "sb", MODEL, StandbyPolicy(startup_grace_s=30), recorder(promoted, "sb"),
                          clock=clock)
    assert await late.check_once() is None  # a standby started into a deficit waits the grace...
    clock.now = 70.0
    assert await late.check_once() == CAPACITY  # ...then serves


async def test_a_worker_the_probe_saw_go_counts_as_lost_before_its_record_expires() -> None:
    store = MemoryStateStore()
    await publisher(store, "live").publish_once()
    await publisher(store, "sb", standby=True).publish_once()
    lost: set[str] = set()
    promoted: list[tuple[str, str]] = []
    watcher = StandbyWatcher(store, "sb", MODEL, StandbyPolicy(), recorder(promoted, "sb"),
                             lost_fn=lambda: lost)
    assert await watcher.check_once() is None
    lost.add("live")  # its health stream broke; the record is still fresh
    assert await watcher.check_once() == CAPACITY
    assert promoted == [("sb", CAPACITY)]


async def test_a_stale_heartbeat_counts_as_lost() -> None:
    store = MemoryStateStore()
    await publisher(store, "live").publish_once()
    await publisher(store, "sb", standby=True).publish_once()
    wall = [time.time()]
    promoted: list[tuple[str, str]] = []
    watcher = StandbyWatcher(store, "sb", MODEL, StandbyPolicy(stale_after_s=2.5), recorder(promoted, "sb"),
                             wall_clock=lambda: wall[0])
    wall[0] += 2.0
    assert await watcher.check_once() is None
    wall[0] += 1.0  # 3 s without a heartbeat: the record has not expired (TTL) but is stale
    assert await watcher.check_once() == CAPACITY


async def test_a_sustained_queue_promotes_one_standby_at_a_time() -> None:
    store = MemoryStateStore()
    live = publisher(store, "live", waiting=12)
    await live.publish_once()
    standbys = {f"sb-{i}": publisher(store, f"sb-{i}", standby=True) for i in range(2)}
    for p in standbys.values():
        await p.publish_once()
    first, second = standby_order((await store.read_fleet()).workers, MODEL)
    clock = Clock()
    promoted: list[tuple[str, str]] = []
    policy = StandbyPolicy(queue_threshold=4, queue_sustain_s=3.0)
    watchers = {wid: StandbyWatcher(store, wid, MODEL, policy, recorder(promoted, wid, p.promote),
                                    clock=clock) for wid, p in standbys.items()}

    async def check_all() -> None:
        for w in watchers.values():
            await w.check_once()

    await check_all()
    clock.now = 2.9
    await check_all()
    assert promoted == []  # over the threshold, not for long enough
    clock.now = 3.0
    await check_all()
    assert promoted == [(first, QUEUE)]
    # 12 waiting over 2 live workers is still over 4, but the live set changed: the timer restarts.
    clock.now = 5.9
    await check_all()
    assert promoted == [(first, QUEUE)]
    clock.now = 6.0
    await check_all()
    assert promoted == [(first, QUEUE), (second, QUEUE)]


async def test_a_short_queue_spike_promotes_nobody() -> None:
    store = MemoryStateStore()
    waiting = [12]
    live = WorkerPublisher(
        store, WorkerIdentity("live", MODEL, "127.0.0.1:1", 16, 2048),
        load_fn=lambda: LoadReport(num_waiting=waiting[0], max_num_seqs=8), kv_events_fn=list,
        cached_hashes_fn=_no_hashes, timing=FAST)
    await live.publish_once()
    await publisher(store, "sb", standby=True).publish_once()
    clock = Clock()
    promoted: list[tuple[str, str]] = []
    watcher = StandbyWatcher(store, "sb", MODEL, StandbyPolicy(queue_threshold=4, queue_sustain_s=3.0),
                             recorder(promoted, "sb"), clock=clock)
    await watcher.check_once()
    clock.now, waiting[0] = 2.0, 0
    await store.heartbeat(live.record(), FAST.ttl_s)  # the next heartbeat reports the queue gone
    await watcher.check_once()
    clock.now, waiting[0] = 4.0, 12
    await store.heartbeat(live.record(), FAST.ttl_s)
    await watcher.check_once()
    clock.now = 6.0  # high again for 2 s only
    await watcher.check_once()
    assert promoted == []


async def _no_hashes() -> set[bytes]:
    return set()


async def test_running_watchers_replace_a_lost_worker_once(redis_server: Any) -> None:
    """The background loop over Redis: three standbys, the live worker goes, one promotes and
    the others stay standbys while they keep watching."""
    store = RedisStateStore(redis_server.url)
    live = publisher(store, "live")
    await live.start()
    standbys = [publisher(store, f"sb-{i}", standby=True) for i in range(3)]
    promoted: list[tuple[str, str]] = []
    watchers = []
    for p in standbys:
        await p.start()
        w = StandbyWatcher(store, p.identity.worker_id, MODEL, StandbyPolicy(poll_interval_s=0.05),
                           recorder(promoted, p.identity.worker_id, p.promote))
        w.start()
        watchers.append(w)
    try:
        await asyncio.sleep(0.3)
        assert promoted == []
        await live.deregister()
        deadline = time.monotonic() + 10
        while not promoted:
            assert time.monotonic() < deadline, "no standby promoted"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # ten more polls of each remaining watcher
        assert len(promoted) == 1
        view = await store.read_fleet()
        assert sorted(w.worker_id for w in view.workers if w.standby) == sorted(
            p.identity.worker_id for p in standbys if p.identity.worker_id != promoted[0][0])
    finally:
        for w in watchers:
            await w.stop()
        for p in standbys:
            await p.stop()
        await store.close()
