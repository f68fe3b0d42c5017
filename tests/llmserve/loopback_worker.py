"""A worker server on a free loopback port, shared by the CLI and the client tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer


@asynccontextmanager
async def loopback_worker(model_dir: Path, served_model_name: str, num_kv_blocks: int) -> AsyncIterator[str]:
    """Serve ``model_dir`` as ``served_model_name``; yields the target once ready, then drains."""
    config = EngineConfig(
        model=str(model_dir), served_model_name=served_model_name, num_kv_blocks=num_kv_blocks
    )
    server = WorkerServer(config, ServerConfig(port=0))
    await server.start()
    await server.wait_ready()
    yield server.target
    await server.drain(0.1)
