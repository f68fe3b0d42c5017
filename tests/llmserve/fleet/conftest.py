"""Fixtures of the fleet tests: each store implementation, over a real redis-server for Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from llmserve.fleet import MemoryStateStore, StateStore
from llmserve.fleet.redis_store import RedisStateStore


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    """A MemoryStateStore, then a RedisStateStore on a fresh redis-server."""
    if request.param == "memory":
        yield MemoryStateStore()
        return
    server: Any = request.getfixturevalue("redis_server")
    s = RedisStateStore(server.url)
    yield s
    await s.close()
