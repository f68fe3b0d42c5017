"""A real worker (tiny model, real engine) and a real router in the test's event loop, on
loopback, each configured as the test needs (TLS, API keys, fleet secret, Redis)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.fleet import StateStore
from llmserve.fleet.redis_store import RedisStateStore
from router.server import RouterConfig, RouterServer
from tests.helpers.redis_server import free_port
from tests.helpers.service_procs import scrape_metrics


@contextlib.asynccontextmanager
async def router_stack(redis_url: str, model_dir: Path, model: str, **router_config: Any
                       ) -> AsyncIterator[RouterStack]:
    """A worker serving ``model_dir`` as ``model`` and a router (HTTP door and ``/metrics`` on a
    free port, plus ``router_config``) over the Redis at ``redis_url``; both stopped after."""
    store = RedisStateStore(redis_url)
    worker = await start_worker(model_dir, model, redis_url)
    router = await start_router(store, http_port=0, metrics_port=0, **router_config)
    try:
        yield RouterStack(worker, router)
    finally:
        await router.stop(grace_s=0.5)
        await worker.drain(0.5)
        await store.close()


@dataclass
class RouterStack:
    """A worker and a router with its HTTP door and ``/metrics`` on."""

    worker: WorkerServer
    router: RouterServer

    @property
    def http_port(self) -> int:
        assert self.router.http_port is not None
        return self.router.http_port

    def metric(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels``, scraped now."""
        assert self.router.metrics_port is not None
        want = set(labels.items())
        return sum(v for (n, ls), v in scrape_metrics(self.router.metrics_port).items()
                   if n == name and want <= ls)


async def start_worker(model_dir: Path, name: str, redis_url: str, **server: Any) -> WorkerServer:
    """A worker serving ``model_dir`` as ``name`` on a free loopback port, registered at
    ``redis_url`` and advertising ``127.0.0.1:port``; returns once it is SERVING."""
    port = free_port()
    engine = EngineConfig(model=str(model_dir), served_model_name=name, device="cpu", num_kv_blocks=128,
                          max_num_seqs=8)
    config = ServerConfig(host=server.pop("host", "127.0.0.1"), port=port,
                          advertise_address=f"127.0.0.1:{port}", redis_url=redis_url, drain_grace_s=1.0,
                          **server)
    worker = WorkerServer(engine, config)
    await worker.start()
    await worker.wait_ready()
    return worker


async def start_router(store: StateStore, **config: Any) -> RouterServer:
    """A router on a free loopback port reading ``store`` (``registry_cache_s`` 0: every request
    sees the store as it is now)."""
    fields = {"port": free_port(), "registry_cache_s": 0.0, **config}
    router = RouterServer(RouterConfig(**fields), store)
    await router.start()
    return router


def worker_idle(worker: WorkerServer) -> bool:
    """No request in flight on ``worker`` and every KV block of its engine free."""
    stats = worker.service.engine.stats()
    return not worker.service.in_flight and stats.num_free_blocks == stats.num_total_blocks
