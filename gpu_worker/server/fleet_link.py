"""Registers the worker in the fleet registry: heartbeat with load, KV block events, drain.

Thin glue between :class:`~gpu_worker.server.service.WorkerService` and
``llmserve.fleet.WorkerPublisher`` (the fleet package owns the store and its Redis code).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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


def _ignore(reason: str) -> None:
    pass


class FleetLink:
    """Keeps this worker's record and KV set in a fleet state store.

    ``store`` is an ``llmserve.fleet.StateStore``; when None, one is opened for
    ``redis_url`` (with ``redis_tls``, and closed again by :meth:`close`). With
    ``fleet_secret_file`` every record is signed with the fleet secret (and, for a standby,
    only signed records of other workers are believed). With ``standby`` (a
    ``llmserve.fleet.standby.StandbyPolicy``) the worker registers as a warm standby and
    promotes itself by that policy (``standby_link.py``); ``on_promoted(reason)`` is then called.
    ``probe_peers``: the standby watches its live peers' health streams (off with TLS).
    """

    def __init__(self, service: WorkerService, redis_url: str | None = None, store: Any = None, *,
                 redis_tls: Any = None, fleet_secret_file: str | None = None, standby: Any = None,
                 on_promoted: Callable[[str], None] | None = None, probe_peers: bool = True) -> None:
        from llmserve.fleet import WorkerIdentity, WorkerPublisher
        from llmserve.security.records import FleetSecretFile, RecordReader

        if store is None and not redis_url:
            raise ValueError("FleetLink needs a redis_url or a store")
        self._owns_store = store is None
        if store is None:  # only a link that opens Redis itself needs the client library
            from llmserve.fleet.redis_store import RedisStateStore, RedisTls

            store = RedisStateStore(str(redis_url), tls=redis_tls or RedisTls())
        self._store = store
        secret = FleetSecretFile(fleet_secret_file).current if fleet_secret_file else None
        snap = service.snapshot()
        engine = service.engine
        served = service.list_models()[0]
        identity = WorkerIdentity(
            snap.worker_id, snap.model, snap.address, snap.block_size, snap.max_model_len,
            served.quantization, served.kv_cache_dtype, served.weight_bytes, adapters=service.adapters,
        )
        self._publisher = WorkerPublisher(
            self._store,
            identity=identity,
            load_fn=_load_fn(service),
            kv_events_fn=engine.take_kv_events,
            cached_hashes_fn=engine.cached_block_hashes,
            secret=secret,
            standby=standby is not None,
        )
        service.on_adapters_changed(self._publisher.set_adapters)
        self._standby: Any = None
        if standby is not None:
            from gpu_worker.server.standby_link import StandbyLink

            reader = RecordReader(max_age_s=self._publisher.timing.ttl_s, secret=secret)
            self._standby = StandbyLink(self._store, self._publisher, standby, on_promoted or _ignore,
                                        reader=reader, probe_peers=probe_peers)

    async def start(self) -> None:
        """Register now and heartbeat in the background (a standby also starts watching)."""
        await self._publisher.start()
        role = "warm standby" if self._publisher.standby else "worker"
        logger.info("registered in the fleet registry as %s (%s)", self._publisher.identity.worker_id, role)
        if self._standby is not None:
            self._standby.start()

    async def mark_draining(self) -> None:
        """Publish draining=True so routers send nothing new."""
        await self._publisher.drain()

    async def close(self) -> None:
        """Deregister, stop heartbeating, close the store if this link opened it."""
        if self._standby is not None:
            await self._standby.close()
        await self._publisher.deregister()
        if self._owns_store:
            await self._store.close()
