"""Fixtures of the engine-front tests: tokenizer, tiny random models and their HF references.

Everything heavy is session-scoped: the SmolLM2 tokenizer is read once, each tiny model is
built and saved once, and HF reference models are loaded once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path) -> Any:
    """The SmolLM2-135M-Instruct tokenizer (byte-level BPE), read from the GGUF by transformers."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Any) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Callable[[str], Path]:
    """``tiny_model(family)`` -> folder of a tiny random model (built once per family)."""
    from helpers.tiny_models import make_tiny_model

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
    """``hf_model(folder)`` -> the HF transformers model of a folder, float32, loaded once."""
    from transformers import AutoModelForCausalLM

    loaded: dict[Path, Any] = {}

    def get(path: Path) -> Any:
        if path not in loaded:
            loaded[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return loaded[path]

    return get
