"""Fixtures of the engine-front tests: HF reference models of the tiny random models.

The tokenizer and the tiny models themselves (``smollm2_tokenizer``, ``tiny_model``) come from
tests/conftest.py. Everything heavy is session-scoped: each HF reference is loaded once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


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
