"""Fixtures of the router tests: a tiny model on disk, redis-server, worker subprocesses, routers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from llmserve.fleet import StateStore
from llmserve.fleet.redis_store import RedisStateStore
from router.server import RouterConfig, RouterServer
from tests.router.router_procs import RedisProc, free_port


@pytest.fixture(scope="session")
def router_tiny_model(tiny_model: Callable[[str], Path]) -> Path:
    """The 2-layer random llama with the SmolLM2 tokenizer (and chat template), tests/conftest.py."""
    return tiny_model("llama")


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    """One redis-server for a whole test module (restartable)."""
    server = RedisProc(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


RouterFactory = Callable[..., "AsyncIterator[RouterServer]"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def make_router(module_redis: RedisProc) -> AsyncIterator[Callable[..., object]]:
    """Start in-process routers on the module's Redis: ``await make_router(policy="prefix")``."""
    started: list[tuple[RouterServer, StateStore]] = []

    async def make(policy: str = "prefix", **kwargs: object) -> RouterServer:
        store = RedisStateStore(module_redis.url)
        server = RouterServer(RouterConfig(port=free_port(), policy=policy, **kwargs), store)  # type: ignore[arg-type]
        await server.start()
        started.append((server, store))
        return server

    yield make
    for server, store in started:
        await server.stop(grace_s=0.5)
        await store.close()
