"""Registers the worker in the fleet registry: heartbeat with load, KV block events, drain.

Thin glue between :class:`~gpu_worker.server.service.WorkerService` and
``llmserve.fleet.WorkerPublisher`` (the fleet package owns the store and its Redis code).
"""

from __future__ import annotations

import logging
from typing import Any

from gpu_worker.server.service import WorkerService

logger = logging.getLogger(__name__)


def _load_fn(service: WorkerService) -> Any:
    from llmserve.fleet import LoadReport

    def load() -> LoadReport:
        snap = service.snapshot()
        return LoadReport(
            num_running=snap.stats.num_running,
            num_waiting=snap.stats.num_waiting,
            kv_usage=snap.stats.kv_usage,
            max_num_seqs=snap.max_num_seqs,
            max_queue_len=snap.max_queue_len,
            num_kv_blocks=snap.stats.num_total_blocks,
        )

    return load


class FleetLink:
    """Keeps this worker's record and KV set in a fleet state store.

    ``store`` is an ``llmserve.fleet.StateStore``; when None, one is opened for
    ``redis_url`` (with ``redis_tls``, and closed again by :meth:`close`). With
    ``fleet_secret_file`` every record is signed with the fleet secret.
    """

    def __init__(self, service: WorkerService, redis_url: str | None = None, store: Any = None, *,
                 redis_tls: Any = None, fleet_secret_file: str | None = None) -> None:
        from llmserve.fleet import WorkerIdentity, WorkerPublisher
        from llmserve.fleet.redis_store import RedisStateStore, RedisTls
        from llmserve.security.records import FleetSecretFile

        if store is None and not redis_url:
            raise ValueError("FleetLink needs a redis_url or a store")
        self._owns_store = store is None
        if store is None:
            store = RedisStateStore(str(redis_url), tls=redis_tls or RedisTls())
        self._store = store
        secret = FleetSecretFile(fleet_secret_file).current if fleet_secret_file else None
        snap = service.snapshot()
        engine = service.engine
        identity = WorkerIdentity(
            snap.worker_id, snap.model, snap.address, snap.block_size, snap.max_model_len
        )
        self._publisher = WorkerPublisher(
            self._store,
            identity=identity,
            load_fn=_load_fn(service),
            kv_events_fn=engine.take_kv_events,
            cached_hashes_fn=engine.cached_block_hashes,
            secret=secret,
        )

    async def start(self) -> None:
        """Register now and heartbeat in the background."""
        await self._publisher.start()
        logger.info("registered in the fleet registry as %s", self._publisher.identity.worker_id)

    async def mark_draining(self) -> None:
        """Publish draining=True so routers send nothing new."""
        await self._publisher.drain()

    async def close(self) -> None:
        """Deregister, stop heartbeating, close the store if this link opened it."""
        await self._publisher.deregister()
        if self._owns_store:
            await self._store.close()
