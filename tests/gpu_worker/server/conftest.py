"""Fixtures of the worker gRPC server tests: the tiny random llama with the SmolLM2 tokenizer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from tests.gpu_worker.server.worker_server_helpers import ENGINE_ARGS


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model: Callable[[str], Path]) -> Path:
    """The 2-layer random llama (vocab 49152, max length 512) of ``tiny_model`` (tests/conftest.py)."""
    return tiny_model("llama")


@pytest.fixture(scope="session")
def engine_config(tiny_model_dir: Path) -> EngineConfig:
    return EngineConfig(model=str(tiny_model_dir), **ENGINE_ARGS)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gen(engine_config: EngineConfig) -> AsyncIterator[pb_grpc.GenerationStub]:
    """A Generation stub on a loopback worker of ``engine_config``, one worker per test module
    (a module may define its own ``gen``)."""
    server = WorkerServer(engine_config, ServerConfig(port=0))
    await server.start()
    await server.wait_ready()
    async with grpc.aio.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationStub(channel)
    await server.drain(0.1)
