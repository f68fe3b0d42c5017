"""The fleet state store interface and its in-process implementation.

Workers write (heartbeat, KV deltas); routers read (live workers, models, prefix matches).
:class:`MemoryStateStore` serves the one-process local stack; ``RedisStateStore`` in
``redis_store.py`` is the same interface over Redis, the only module importing ``redis``.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from llmserve.fleet.records import KVDelta, WorkerRecord
from llmserve.security.records import RecordReader, RecordRejected, Rejection, check_model_name, over_limit


class StoreUnavailable(Exception):
    """The state store could not be reached; callers keep their last known state and retry."""


@dataclass(frozen=True)
class FleetView:
    """One read of the fleet: live worker records, every model ever served, and the store epoch.

    ``epoch`` is a random token written once per store lifetime; a change means the store lost
    its data (a Redis restart) and workers are re-registering. ``workers`` holds only records
    that passed the read's :class:`~llmserve.security.records.RecordReader`; the others are
    listed in ``rejected`` (never an error: a bad record only takes itself out).
    """

    workers: tuple[WorkerRecord, ...]
    models: frozenset[str]
    epoch: str | None
    rejected: tuple[Rejection, ...] = ()


def parse_records(blobs: Sequence[tuple[str, bytes | str]], reader: RecordReader) -> tuple[
        list[WorkerRecord], list[Rejection]]:
    """Check each ``(stored id, bytes)`` with ``reader``: (good records, rejections)."""
    records: list[WorkerRecord] = []
    rejected: list[Rejection] = []
    for key_id, blob in blobs:
        try:
            records.append(reader.read(key_id, blob))
        except RecordRejected as exc:
            rejected.append(Rejection(key_id, exc.reason, exc.detail))
    return records, rejected


def checked_models(names: Iterable[str], limit: int) -> frozenset[str]:
    """Model names that may be names (bounded, printable), at most ``limit`` of them."""
    return frozenset(sorted(n for n in names if check_model_name(n))[:limit])


class StateStore(abc.ABC):
    """Shared fleet state. All methods raise :class:`StoreUnavailable` when the store is down."""

    @abc.abstractmethod
    async def heartbeat(self, record: WorkerRecord, ttl_s: float) -> bool:
        """Write ``record`` with a TTL, register its id and model, refresh the TTL of its KV set.

        Returns True when the worker's KV-sync marker exists, False when the store has lost the
        worker's KV set (the worker must then call :meth:`replace_kv`).
        """

    @abc.abstractmethod
    async def replace_kv(self, worker_id: str, hashes: Iterable[bytes], ttl_s: float) -> None:
        """Atomically replace the worker's KV set with ``hashes`` and set its sync marker."""

    @abc.abstractmethod
    async def apply_kv(self, worker_id: str, deltas: Sequence[KVDelta], ttl_s: float) -> None:
        """Apply KV deltas in order (``cleared`` deltas are the caller's business)."""

    @abc.abstractmethod
    async def remove_worker(self, worker_id: str) -> None:
        """Deregister: drop the record, the KV set and the marker."""

    @abc.abstractmethod
    async def forget_model(self, name: str) -> None:
        """Drop ``name`` from the models ever served (an unloaded LoRA adapter): unknown from now
        on (NOT_FOUND rather than UNAVAILABLE), unless a worker serves it again."""

    @abc.abstractmethod
    async def read_fleet(self, reader: RecordReader | None = None) -> FleetView:
        """Live workers (stale ids are pruned), models ever served, and the epoch.

        Every record is checked by ``reader`` (default: ``RecordReader()``, types, ranges and
        heartbeat age; no signature); those that fail are in ``FleetView.rejected``.
        """

    @abc.abstractmethod
    async def match_prefixes(self, queries: Mapping[str, Sequence[bytes]]) -> dict[str, int]:
        """For each worker id, how many leading hashes of its chain are in its KV set.

        One round trip for all workers; the match ends at the first missing hash.
        """

    # -- documents: opaque blobs the routers share (stored responses of the Responses API) -------
    @abc.abstractmethod
    async def put_document(self, kind: str, key: str, blob: bytes, ttl_s: float) -> None:
        """Store ``blob`` under (``kind``, ``key``) for ``ttl_s`` seconds, replacing any earlier one."""

    @abc.abstractmethod
    async def get_document(self, kind: str, key: str) -> bytes | None:
        """The blob under (``kind``, ``key``), None when there is none (or it expired). Untrusted:
        the caller checks it as it checks anything read from the store."""

    @abc.abstractmethod
    async def delete_document(self, kind: str, key: str) -> bool:
        """Drop the blob under (``kind``, ``key``); True when there was one."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def leading_matches(flags: Sequence[bool | int]) -> int:
    """Index of the first false flag (length of the matched prefix)."""
    for i, flag in enumerate(flags):
        if not flag:
            return i
    return len(flags)


DEFAULT_MEMORY_DOCUMENT_BYTES = 256 * 1024 * 1024


class MemoryStateStore(StateStore):
    """In-process store with the same semantics as Redis, TTLs included (one event loop).

    Documents take at most ``max_document_bytes`` in all: past it the oldest stored are dropped
    first (as a Redis with ``maxmemory-policy`` ``volatile-*`` evicts keys with a TTL)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 max_document_bytes: int = DEFAULT_MEMORY_DOCUMENT_BYTES) -> None:
        if max_document_bytes < 0:
            raise ValueError("max_document_bytes must be >= 0")
        self._now = clock
        self._max_document_bytes = max_document_bytes
        # (kind, key) -> (blob, expiry), oldest stored first; _document_bytes is their blobs' sum
        self._documents: dict[tuple[str, str], tuple[bytes, float]] = {}
        self._document_bytes = 0
        self._records: dict[str, tuple[str, float]] = {}  # id -> (JSON, expiry), as Redis holds them
        self._kv: dict[str, set[bytes]] = {}
        self._kv_expiry: dict[str, float] = {}
        self._markers: dict[str, float] = {}
        self._models: set[str] = set()
        self._epoch = uuid.uuid4().hex

    def _alive(self, expiry: dict[str, float], key: str) -> bool:
        deadline = expiry.get(key)
        if deadline is None:
            return False
        if deadline <= self._now():
            expiry.pop(key, None)
            return False
        return True

    def _kv_set(self, worker_id: str) -> set[bytes]:
        if not self._alive(self._kv_expiry, worker_id):
            self._kv.pop(worker_id, None)
        return self._kv.setdefault(worker_id, set())

    async def heartbeat(self, record: WorkerRecord, ttl_s: float) -> bool:
        deadline = self._now() + ttl_s
        self._records[record.worker_id] = (record.to_json(), deadline)
        self._models.update(record.served_names)
        if self._alive(self._kv_expiry, record.worker_id):
            self._kv_expiry[record.worker_id] = deadline
        if self._alive(self._markers, record.worker_id):
            self._markers[record.worker_id] = deadline
            return True
        return False

    async def replace_kv(self, worker_id: str, hashes: Iterable[bytes], ttl_s: float) -> None:
        deadline = self._now() + ttl_s
        self._kv[worker_id] = set(hashes)
        self._kv_expiry[worker_id] = deadline
        self._markers[worker_id] = deadline

    async def apply_kv(self, worker_id: str, deltas: Sequence[KVDelta], ttl_s: float) -> None:
        kv = self._kv_set(worker_id)
        for delta in deltas:
            kv.update(delta.stored)
            kv.difference_update(delta.removed)
        self._kv_expiry[worker_id] = self._now() + ttl_s

    async def remove_worker(self, worker_id: str) -> None:
        self._records.pop(worker_id, None)
        self._kv.pop(worker_id, None)
        self._kv_expiry.pop(worker_id, None)
        self._markers.pop(worker_id, None)

    async def forget_model(self, name: str) -> None:
        self._models.discard(name)

    async def read_fleet(self, reader: RecordReader | None = None) -> FleetView:
        reader = reader or RecordReader()
        now = self._now()
        for wid in [w for w, (_, deadline) in self._records.items() if deadline <= now]:
            del self._records[wid]
        ids, skipped = over_limit(list(self._records), reader.max_records)
        records, rejected = parse_records([(w, self._records[w][0]) for w in ids], reader)
        rejected.extend(skipped)
        return FleetView(workers=tuple(records), models=checked_models(self._models, reader.max_records),
                         epoch=self._epoch, rejected=tuple(rejected))

    async def match_prefixes(self, queries: Mapping[str, Sequence[bytes]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for wid, chain in queries.items():
            kv = self._kv.get(wid, set()) if self._alive(self._kv_expiry, wid) else set()
            out[wid] = leading_matches([h in kv for h in chain])
        return out

    async def put_document(self, kind: str, key: str, blob: bytes, ttl_s: float) -> None:
        await self.delete_document(kind, key)  # a replaced document counts as stored now
        if len(blob) > self._max_document_bytes:
            return  # never fits: as if evicted at once
        self._documents[(kind, key)] = (bytes(blob), self._now() + ttl_s)
        self._document_bytes += len(blob)
        while self._document_bytes > self._max_document_bytes:
            oldest = next(iter(self._documents))
            self._document_bytes -= len(self._documents.pop(oldest)[0])

    async def get_document(self, kind: str, key: str) -> bytes | None:
        entry = self._documents.get((kind, key))
        if entry is None:
            return None
        if entry[1] <= self._now():
            await self.delete_document(kind, key)
            return None
        return entry[0]

    async def delete_document(self, kind: str, key: str) -> bool:
        entry = self._documents.pop((kind, key), None)
        if entry is None:
            return False
        self._document_bytes -= len(entry[0])
        return entry[1] > self._now()
