"""Checkpoint tensors of an HF folder (single or sharded safetensors) and random fills."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

_INDEX = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint files of ``model_dir``: those the index names, else ``*.safetensors``."""
    index = model_dir / _INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    return files


def iter_safetensors(model_dir: Path, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(HF name, tensor)`` for every tensor of the checkpoint, read onto ``device``."""
    from safetensors import safe_open

    target = "cpu" if device.type == "cpu" else str(device)
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt", device=target) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def fill_random(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Dummy weights: norm scales 1, everything else N(0, std), drawn on the parameters' device."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            generator = torch.Generator(device=param.device)
            generator.manual_seed(seed + _stable_offset(name))
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)


def _stable_offset(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % 1_000_003
