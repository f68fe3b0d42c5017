"""Fixtures of the worker gRPC server tests: the tiny random llama with the SmolLM2 tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gpu_worker.config import EngineConfig
from tests.gpu_worker.server.worker_server_helpers import ENGINE_ARGS


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model: Callable[[str], Path]) -> Path:
    """The 2-layer random llama (vocab 49152, max length 512) of ``tiny_model`` (tests/conftest.py)."""
    return tiny_model("llama")


@pytest.fixture(scope="session")
def engine_config(tiny_model_dir: Path) -> EngineConfig:
    return EngineConfig(model=str(tiny_model_dir), **ENGINE_ARGS)
