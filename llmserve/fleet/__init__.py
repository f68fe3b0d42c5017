"""Fleet state shared by workers and routers: records, the state store, publisher and registry.

Torch-free. ``redis_store`` is the only module importing ``redis``; it is not imported here,
so the in-process store works without a Redis client installed.
"""

from llmserve.fleet.publisher import PublisherTiming, WorkerIdentity, WorkerPublisher
from llmserve.fleet.records import KVDelta, LoadReport, WorkerRecord, as_kv_delta
from llmserve.fleet.registry import FleetSnapshot, Registry
from llmserve.fleet.store import (
    DEFAULT_MEMORY_DOCUMENT_BYTES,
    FleetView,
    MemoryStateStore,
    StateStore,
    StoreUnavailable,
)


def open_store(redis_url: str | None, max_document_bytes: int = DEFAULT_MEMORY_DOCUMENT_BYTES) -> StateStore:
    """A Redis store for ``redis_url``, or a fresh in-process store when it is None (holding
    at most ``max_document_bytes`` of documents)."""
    if redis_url:
        from llmserve.fleet.redis_store import RedisStateStore

        return RedisStateStore(redis_url)
    return MemoryStateStore(max_document_bytes=max_document_bytes)


__all__ = [
    "DEFAULT_MEMORY_DOCUMENT_BYTES",
    "FleetSnapshot",
    "FleetView",
    "KVDelta",
    "MemoryStateStore",
    "PublisherTiming",
    "Registry",
    "StateStore",
    "StoreUnavailable",
    "WorkerIdentity",
    "LoadReport",
    "WorkerPublisher",
    "WorkerRecord",
    "as_kv_delta",
    "open_store",
]
