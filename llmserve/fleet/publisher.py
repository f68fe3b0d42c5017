"""Worker side of the fleet state: heartbeats with load, and the worker's KV set.

The worker's glue (``gpu_worker/server/fleet_link.py``) builds one :class:`WorkerPublisher` from
plain callables, so this module knows nothing of the engine:

    publisher = WorkerPublisher(
        store, identity=WorkerIdentity(worker_id, model, address, block_size, max_model_len),
        load_fn=lambda: LoadReport(...),          # current load
        kv_events_fn=engine.take_kv_events,       # drains pending KV events (see as_kv_delta)
        cached_hashes_fn=engine.cached_block_hashes,  # async: every cached hash, for resync
    )
    await publisher.start()      # registers at once, then runs in the background
    await publisher.drain()      # heartbeats draining=True: routers stop sending
    await publisher.deregister()  # stops and removes the worker from the store

A warm standby publishes with ``standby=True`` (routers do not route to it) until
``await publisher.promote()`` heartbeats it as a live worker at once.

All three are called on the event loop's thread. ``load_fn`` and ``kv_events_fn`` return at once
(snapshots); ``cached_hashes_fn`` is a coroutine function the engine answers between two steps,
so a resync never blocks the event loop (and with it every other call on the worker).

Store outages never raise out of the publisher: it retries every tick and, once the store
answers again, republishes its whole KV set (events drained meanwhile are lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace

from llmserve.fleet.records import KVDelta, LoadReport, WorkerRecord, as_kv_delta
from llmserve.fleet.store import StateStore, StoreUnavailable
from llmserve.kv_events import KVEvent
from llmserve.security.records import SecretSource

log = logging.getLogger(__name__)

_STOP_RETRY_S = 1.0  # stop(): how long to wait for the loop to end before cancelling it again


@dataclass(frozen=True)
class WorkerIdentity:
    """What does not change during a worker's life, but for ``adapters`` (runtime LoRA loading:
    :meth:`WorkerPublisher.set_adapters`)."""

    worker_id: str
    model: str  # served model name (also the block-hash seed)
    address: str  # host:port routers dial
    block_size: int
    max_model_len: int
    quantization: str = ""  # weights' format ("none", "fp8", "gptq", "gguf")
    kv_cache_dtype: str = ""  # "auto" or "fp8"
    weight_bytes: int = 0
    adapters: tuple[str, ...] = ()  # LoRA adapters served besides ``model``, each its own model name


@dataclass(frozen=True)
class PublisherTiming:
    """Intervals of the publisher; TTL must exceed the heartbeat interval several times."""

    heartbeat_interval_s: float = 1.0
    ttl_s: float = 5.0
    kv_flush_interval_s: float = 0.05  # KV events reach the store this fast (prefix routing)

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval_s < self.ttl_s:
            raise ValueError("need 0 < heartbeat_interval_s < ttl_s")
        if not 0 < self.kv_flush_interval_s <= self.heartbeat_interval_s:
            raise ValueError("need 0 < kv_flush_interval_s <= heartbeat_interval_s")


class WorkerPublisher:
    """Keeps one worker's record and KV set in the fleet state store."""

    def __init__(
        self,
        store: StateStore,
        identity: WorkerIdentity,
        load_fn: Callable[[], LoadReport],
        kv_events_fn: Callable[[], Iterable[KVEvent | KVDelta]],
        cached_hashes_fn: Callable[[], Awaitable[Iterable[bytes]]],
        timing: PublisherTiming = PublisherTiming(),
        secret: SecretSource | None = None,
        standby: bool = False,
    ) -> None:
        """``secret`` returns the fleet secret that signs each record (None: unsigned);
        ``standby``: register as a warm standby until :meth:`promote`."""
        self._store = store
        self._standby = standby
        self._secret = secret
        self._identity = identity
        self._load_fn = load_fn
        self._kv_events_fn = kv_events_fn
        self._cached_hashes_fn = cached_hashes_fn
        self._timing = timing
        self._draining = False
        self._needs_resync = True
        self._next_heartbeat = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._store_down = False

    @property
    def identity(self) -> WorkerIdentity:
        return self._identity

    @property
    def timing(self) -> PublisherTiming:
        return self._timing

    @property
    def standby(self) -> bool:
        """True while this worker is registered as a warm standby."""
        return self._standby

    def record(self) -> WorkerRecord:
        """The record the next heartbeat writes (signed when the publisher has a fleet secret)."""
        i = self._identity
        record = WorkerRecord(
            worker_id=i.worker_id,
            model=i.model,
            address=i.address,
            block_size=i.block_size,
            max_model_len=i.max_model_len,
            load=self._load_fn(),
            draining=self._draining,
            heartbeat_at=time.time(),
            standby=self._standby,
            quantization=i.quantization,
            kv_cache_dtype=i.kv_cache_dtype,
            weight_bytes=i.weight_bytes,
            adapters=i.adapters,
        )
        if self._secret is None:
            return record
        return replace(record, sig=self._secret().sign(record.fields()))

    async def start(self) -> None:
        """Publish once (best effort), then keep publishing in the background."""
        await self.publish_once()
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=f"publisher-{self._identity.worker_id}")

    async def stop(self) -> None:
        """Stop publishing; the record then expires after its TTL.

        The loop also checks a stop flag, and the task is cancelled until it is done: redis-py
        can swallow a cancellation that lands inside one of its calls, and a drain must never
        hang on that."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=_STOP_RETRY_S)
        with contextlib.suppress(asyncio.CancelledError):
            task.result()

    async def set_adapters(self, adapters: tuple[str, ...]) -> None:
        """Publish the LoRA adapters the worker serves now (after a runtime load or unload) at
        once: routers see the change on their next registry read."""
        self._identity = replace(self._identity, adapters=tuple(adapters))
        self._next_heartbeat = 0.0
        await self.publish_once()

    async def drain(self) -> None:
        """Announce draining at once: routers stop sending new requests here."""
        self._draining = True
        self._next_heartbeat = 0.0
        await self.publish_once()

    async def promote(self) -> bool:
        """Stop being a standby: heartbeat as a live worker now, so routers route here from their
        next read of the registry. True when the store took the heartbeat (otherwise the next tick
        retries, as for any heartbeat)."""
        self._standby = False
        self._next_heartbeat = 0.0
        return await self.publish_once()

    async def deregister(self) -> None:
        """Stop and remove this worker from the store (best effort: TTL cleans up otherwise)."""
        await self.stop()
        try:
            await self._store.remove_worker(self._identity.worker_id)
        except StoreUnavailable as exc:
            log.warning("deregister failed, the record expires by TTL: %s", exc)

    async def publish_once(self) -> bool:
        """One tick: drain KV events, heartbeat when due, push the KV changes. True on success."""
        deltas = [as_kv_delta(e) for e in self._kv_events_fn()]
        if any(d.cleared for d in deltas):
            self._needs_resync = True
        now = time.monotonic()
        wid = self._identity.worker_id
        ttl = self._timing.ttl_s
        try:
            if now >= self._next_heartbeat or self._needs_resync:
                in_sync = await self._store.heartbeat(self.record(), ttl)
                self._next_heartbeat = now + self._timing.heartbeat_interval_s
                self._needs_resync = self._needs_resync or not in_sync
            if self._needs_resync:
                # The snapshot is taken after draining, so it already reflects those deltas.
                await self._store.replace_kv(wid, await self._cached_hashes_fn(), ttl)
                self._needs_resync = False
            elif deltas:
                await self._store.apply_kv(wid, [replace(d, cleared=False) for d in deltas], ttl)
        except StoreUnavailable as exc:
            if not self._store_down:
                log.warning("fleet store unreachable, retrying: %s", exc)
            self._store_down = True
            self._needs_resync = True
            return False
        if self._store_down:
            log.info("fleet store reachable again; worker %s republished", wid)
        self._store_down = False
        return True

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._timing.kv_flush_interval_s)
            try:
                await self.publish_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in a callable must not kill heartbeats silently
                log.exception("publisher tick failed")


__all__ = ["KVDelta", "PublisherTiming", "WorkerIdentity", "WorkerPublisher"]
