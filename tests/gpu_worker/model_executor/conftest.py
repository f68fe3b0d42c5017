"""Fixtures of the loader/model tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_worker.model_executor import loader


@pytest.fixture(scope="session")
def gguf_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide LLMSERVE_CACHE_DIR (the runner tests use the same path: one GGUF conversion)."""
    return tmp_path_factory.getbasetemp() / "llmserve-cache"


@pytest.fixture(scope="session")
def smollm2_source(gguf_cache_dir: Path, smollm2_gguf: Path) -> loader.ModelSource:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMSERVE_CACHE_DIR", str(gguf_cache_dir))
        return loader.resolve_model(str(smollm2_gguf))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Small CPU matmuls run faster on one thread, and the test machine's cores are shared."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
