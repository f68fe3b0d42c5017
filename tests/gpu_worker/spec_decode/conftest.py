"""Fixtures of the speculative-decoding tests: a draft model that agrees with the tiny llama
only partly (its MLP output weights perturbed), so verification accepts and rejects."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.torch_threads import _one_torch_thread  # noqa: F401 - autouse fixture


@pytest.fixture(scope="session")
def perturbed_draft(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], Path]) -> Path:
    """The tiny llama with noise (0.3 of each tensor's spread) on its MLP down projections."""
    import torch
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("draft") / "llama-perturbed"
    shutil.copytree(tiny_model("llama"), path)
    weights = load_file(path / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for name, tensor in weights.items():
        if "mlp.down_proj" in name:
            weights[name] = tensor + 0.3 * tensor.std() * torch.randn(tensor.shape, generator=generator)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path
