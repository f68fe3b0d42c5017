"""Fixtures of the loader/model tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_worker.model_executor import loader
from tests.helpers.torch_threads import _one_torch_thread  # noqa: F401 - autouse fixture


@pytest.fixture(scope="session")
def gguf_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide LLMSERVE_CACHE_DIR (the runner tests use the same path: one GGUF conversion)."""
    return tmp_path_factory.getbasetemp() / "llmserve-cache"


@pytest.fixture(scope="session")
def smollm2_source(gguf_cache_dir: Path, smollm2_gguf: Path) -> loader.ModelSource:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMSERVE_CACHE_DIR", str(gguf_cache_dir))
        return loader.resolve_model(str(smollm2_gguf))
