"""Router side of the fleet state: a cached view of live workers and the prefix lookup.

The router asks :meth:`Registry.snapshot` on every request; the store is read at most once per
``cache_s`` (single flight). When the store is unreachable the last known snapshot keeps
serving. When the store's epoch changes (Redis restarted and lost its data), the view is
rebuilt from what the store holds now, and workers of the previous snapshot stay listed for
``grace_s`` while they re-register, so no model disappears during the gap. Worker-side
publishing lives in :mod:`llmserve.fleet.publisher`.

Nothing read from the store is trusted: every record goes through a
:class:`~llmserve.security.records.RecordReader` (types, ranges, heartbeat age, optional
signature); bad ones are skipped, logged (rate-limited) and handed to ``on_refresh`` in
``FleetSnapshot.rejected`` for counting. At most ``max_workers_per_model`` workers of a model
are kept (by worker id), so memory stays bounded whatever the store holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from llmserve.fleet.publisher import PublisherTiming, WorkerIdentity, WorkerPublisher
from llmserve.fleet.records import KVDelta, LoadReport, WorkerRecord
from llmserve.fleet.store import FleetView, StateStore, StoreUnavailable
from llmserve.security.records import RecordReader, Rejection, RejectionLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetSnapshot:
    """What the router knows of the fleet at one instant."""

    workers: tuple[WorkerRecord, ...]
    models: frozenset[str]  # every model (LoRA adapters included) ever served (NOT_FOUND vs UNAVAILABLE)
    stale: bool = False  # True while serving the last known state (store down or re-syncing)
    rejected: tuple[Rejection, ...] = ()  # records the read that made this snapshot skipped
    epoch_changed: bool = False  # the read that made this snapshot found a new store epoch

    def workers_of(self, model: str) -> list[WorkerRecord]:
        """Workers that serve ``model`` (as their model or as one of their LoRA adapters) and
        accept new requests (neither draining nor standby), by id."""
        return sorted(
            (w for w in self.workers if model in w.served_names and not w.draining and not w.standby),
            key=lambda w: w.worker_id,
        )

    def live_models(self) -> dict[str, list[WorkerRecord]]:
        """Model name -> its workers that accept new requests (neither draining nor standby); a
        LoRA adapter is a model of its own here, listing the workers that have it."""
        out: dict[str, list[WorkerRecord]] = {}
        for w in self.workers:
            if not w.draining and not w.standby:
                for name in w.served_names:
                    out.setdefault(name, []).append(w)
        return out

    def standby_counts(self) -> dict[str, int]:
        """Model name (adapters included) -> its warm standby workers (not draining); models
        without one are absent."""
        out: dict[str, int] = {}
        for w in self.workers:
            if w.standby and not w.draining:
                for name in w.served_names:
                    out[name] = out.get(name, 0) + 1
        return out

    def parent_of(self, name: str) -> str:
        """The base model of the LoRA adapter ``name``: "" for a base model (a name some worker
        serves as its model) or a name no listed worker serves. Workers that disagree: the
        smallest base model name, so every router answers the same."""
        if any(w.model == name for w in self.workers):
            return ""
        return min((w.model for w in self.workers if name in w.adapters), default="")


class Registry:
    """Cached, failure-tolerant view of the fleet for one router process."""

    def __init__(
        self,
        store: StateStore,
        *,
        cache_s: float = 1.0,
        grace_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_refresh: Callable[[FleetSnapshot], None] | None = None,
        reader: RecordReader | None = None,
        max_workers_per_model: int = 256,
    ) -> None:
        """``on_refresh`` is called with every snapshot read from the store (e.g. to update the
        live-workers metrics); it must be quick and must not raise. ``reader`` checks each
        record (default ``RecordReader()``: no signatures)."""
        if max_workers_per_model < 1:
            raise ValueError("max_workers_per_model must be >= 1")
        self._store = store
        self._on_refresh = on_refresh
        self._reader = reader or RecordReader()
        self._max_per_model = max_workers_per_model
        self._rejections = RejectionLog(log)
        self.epoch_changes = 0  # times the store was seen losing its data
        self._cache_s = cache_s
        self._grace_s = grace_s
        self._clock = clock
        self._snapshot = FleetSnapshot(workers=(), models=frozenset(), stale=True)
        self._epoch: str | None = None
        self._have_read = False
        self._next_refresh = 0.0
        self._read_at = float("-inf")  # clock() when the last read of the store started
        self._carry: tuple[WorkerRecord, ...] = ()
        self._carry_until = 0.0
        self._lock = asyncio.Lock()
        self._refreshing = False
        self._read_task: asyncio.Task[None] | None = None  # the store read in flight, if any

    async def snapshot(self) -> FleetSnapshot:
        """The fleet as of at most ``cache_s`` ago (or the last known one if the store is down).

        While a read is in flight, callers get the previous snapshot, unless it lists no worker
        (a router that started before its workers, or idle since): they wait for the read rather
        than answer NOT_FOUND to a burst of requests."""
        if self._clock() < self._next_refresh and not (self._refreshing and not self._snapshot.workers):
            return self._snapshot
        async with self._lock:
            if self._clock() >= self._next_refresh:
                await self._refresh()
        return self._snapshot

    async def recent(self, max_age_s: float) -> FleetSnapshot:
        """The fleet as of at most ``max_age_s`` ago, read now if the last read is older (one read
        in flight at a time). For a router that has just seen its view fail (every candidate
        unreachable): a worker died, a standby may have taken over; the bound keeps a failing
        model's requests from reading the store more often than once per ``max_age_s``."""
        if self._clock() - self._read_at <= max_age_s:
            return self._snapshot
        async with self._lock:
            if self._clock() - self._read_at > max_age_s:
                await self._refresh()
        return self._snapshot

    async def refresh(self) -> FleetSnapshot:
        """Read the store now, ignoring the cache."""
        async with self._lock:
            await self._refresh()
        return self._snapshot

    async def forget_model(self, name: str) -> FleetSnapshot:
        """Forget that ``name`` was ever served (an unloaded LoRA adapter; ``StateStore.forget_model``)
        and read the store again: requests for it are NOT_FOUND unless a worker still serves it."""
        async with self._lock:
            await self._store.forget_model(name)
            self._snapshot = replace(self._snapshot, models=self._snapshot.models - {name})
            await self._refresh()
        return self._snapshot

    async def _refresh(self) -> None:
        """Read the store and merge what it holds, in a task of its own that no caller's
        cancellation reaches: a request cancelled during a refresh (its client went away) must
        not cancel a Redis read midway, since redis-py (8.2) can then hang the cancelled task,
        here with the lock held and every later refresh waiting on it. A read left by a
        cancelled caller finishes on its own, and the next refresh awaits it."""
        task = self._read_task
        if task is None or task.done():
            task = self._read_task = asyncio.get_running_loop().create_task(self._read())
            task.add_done_callback(_retrieve_exception)
        await asyncio.shield(task)

    async def _read(self) -> None:
        now = self._clock()
        self._next_refresh = now + self._cache_s
        self._read_at = now
        self._refreshing = True
        try:
            view = await self._store.read_fleet(self._reader)
        except StoreUnavailable as exc:
            if not self._snapshot.stale:
                log.warning("fleet store unreachable, serving the last known registry: %s", exc)
            self._snapshot = FleetSnapshot(self._snapshot.workers, self._snapshot.models, stale=True)
            return
        finally:
            self._refreshing = False
        self._snapshot = self._merge(view, now)
        if self._on_refresh is not None:
            self._on_refresh(self._snapshot)

    @property
    def epoch(self) -> str | None:
        """The store epoch of the last read (None before the first, or if the store has none)."""
        return self._epoch

    def _merge(self, view: FleetView, now: float) -> FleetSnapshot:
        # X -> None (emptied) and X -> Y (emptied and rewritten) are a loss; None -> Y is only the
        # first heartbeat into an empty store, after a loss already counted or at start-up.
        changed = self._have_read and self._epoch is not None and view.epoch != self._epoch
        if changed:
            self.epoch_changes += 1
            log.warning("fleet store epoch changed (%s -> %s): the store lost its data; rebuilding the "
                        "view, keeping known workers %.1fs while they re-register",
                        self._epoch, view.epoch, self._grace_s)
            self._carry = self._snapshot.workers
            self._carry_until = now + self._grace_s
        self._epoch = view.epoch
        self._have_read = True
        workers, over = self._capped(view.workers)
        rejected = (*view.rejected, *over)
        for rejection in rejected:
            self._rejections.report(rejection)
        stale = False
        if now < self._carry_until:
            fresh_ids = {w.worker_id for w in workers}
            carried = [w for w in self._carry if w.worker_id not in fresh_ids]
            workers.extend(carried)
            stale = bool(carried)
        models = view.models | {name for w in workers for name in w.served_names}
        if len(models | self._snapshot.models) <= self._reader.max_records:  # bounded whatever Redis holds
            models |= self._snapshot.models
        return FleetSnapshot(tuple(sorted(workers, key=lambda w: w.worker_id)), frozenset(models), stale,
                             rejected, changed)

    def _capped(self, records: tuple[WorkerRecord, ...]) -> tuple[list[WorkerRecord], list[Rejection]]:
        """At most ``max_workers_per_model`` records per model (lowest ids: every router keeps the
        same ones), and a rejection counting the rest of each model."""
        by_model: dict[str, list[WorkerRecord]] = {}
        for record in records:
            by_model.setdefault(record.model, []).append(record)
        kept: list[WorkerRecord] = []
        over: list[Rejection] = []
        for model, group in by_model.items():
            group.sort(key=lambda w: w.worker_id)
            kept.extend(group[: self._max_per_model])
            if len(group) > self._max_per_model:
                rest = len(group) - self._max_per_model
                over.append(Rejection(group[self._max_per_model].worker_id, "over_limit",
                                      f"model {model[:64]!r} has {rest} workers beyond the first "
                                      f"{self._max_per_model}", rest))
        return kept, over

    async def longest_prefixes(self, chains: Mapping[str, Sequence[bytes]]) -> dict[str, int]:
        """Matched leading blocks per worker id, in one store round trip; zeros if the store is down."""
        if not chains:
            return {}
        task = asyncio.get_running_loop().create_task(self._store.match_prefixes(chains))
        task.add_done_callback(_retrieve_exception)
        try:
            return await asyncio.shield(task)  # a cancelled request leaves the read to finish (above)
        except StoreUnavailable as exc:
            log.debug("prefix lookup skipped: %s", exc)
            return {wid: 0 for wid in chains}


def _retrieve_exception(task: asyncio.Task[object]) -> None:
    """Done callback of a store read no caller may be left to await (its caller was cancelled):
    its failure is logged once instead of asyncio's "exception was never retrieved"."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("fleet store read failed: %r", exc)


__all__ = [
    "FleetSnapshot",
    "KVDelta",
    "PublisherTiming",
    "Registry",
    "WorkerIdentity",
    "LoadReport",
    "WorkerPublisher",
    "WorkerRecord",
]
