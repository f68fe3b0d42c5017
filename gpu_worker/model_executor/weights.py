r"""Checkpoint tensors of an HF folder (single or sharded safetensors) and random fills.

Tensors come as :class:`TensorSource`\ s: a rank reads only the slice of each tensor it holds
(``narrow``), straight from the safetensors file, so loading a sharded model never holds more
than a rank's part of the weights in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
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


class TensorSource:
    """One checkpoint tensor, read lazily: :meth:`narrow` reads only the slice asked for."""

    def __init__(self, shape: tuple[int, ...], read: Callable[[tuple[slice, ...]], torch.Tensor]) -> None:
        self.shape = shape
        self._read = read

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSource:
        """A source over a tensor already in memory."""
        return cls(tuple(tensor.shape), lambda index: tensor[index])

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """``tensor.narrow(dim, start, length)``, reading only those elements."""
        index = tuple(
            slice(start, start + length) if d == dim else slice(None) for d in range(len(self.shape))
        )
        return self._read(index)

    def full(self) -> torch.Tensor:
        return self._read(tuple(slice(None) for _ in self.shape))


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, TensorSource]]:
    """Yield ``(HF name, source)`` for every tensor of the checkpoint (CPU reads; the layers
    copy what they keep onto their device)."""
    from safetensors import safe_open

    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                part = f.get_slice(name)
                yield name, TensorSource(tuple(part.get_shape()), part.__getitem__)


def fill_random(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Dummy weights: norm scales 1, everything else N(0, std), drawn on the parameters' device.

    A linear layer whose method has a layout of its own (fp8, 4-bit) draws its weight in that
    layout directly, layer by layer (``LinearMethod.fill_random``): the model never exists in
    16 bits."""
    drawn: set[str] = set()
    for prefix, module in model.named_modules():
        method = getattr(module, "linear_method", None)
        if method is not None and method.fill_random(module, seed + _stable_offset(f"{prefix}.weight"), std):
            drawn |= {f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False) if n != "bias"}
        own_fill = getattr(module, "fill_random", None)  # a layout of its own (fp8 experts: FusedMoE)
        if method is None and callable(own_fill) and own_fill(seed + _stable_offset(prefix), std):
            drawn |= {f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in drawn:
                continue
            generator = torch.Generator(device=param.device)
            generator.manual_seed(seed + _stable_offset(name))
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)


def _stable_offset(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % 1_000_003
