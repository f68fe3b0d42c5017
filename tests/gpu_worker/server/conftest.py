"""Fixtures of the worker gRPC server tests: a tiny random llama with the SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.tiny_models import make_tiny_model, save_smollm2_tokenizer
from worker_server_helpers import ENGINE_ARGS

from gpu_worker.config import EngineConfig


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """A 2-layer random llama (vocab 49152, max length 512) saved with its tokenizer."""
    root = tmp_path_factory.mktemp("server-model")
    tokenizer_dir = save_smollm2_tokenizer(root / "tokenizer", smollm2_gguf)
    return make_tiny_model("llama", root / "llama", tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def engine_config(tiny_model_dir: Path) -> EngineConfig:
    return EngineConfig(model=str(tiny_model_dir), **ENGINE_ARGS)
