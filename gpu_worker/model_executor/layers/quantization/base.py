"""How a linear layer stores its weight and multiplies by it: the seam quantization plugs into.

A :class:`LinearMethod` is chosen at load time for each linear layer (ARCHITECTURE: quantization
is a property of a linear layer): it creates the layer's weight parameters, converts them once
the checkpoint is loaded, and performs the product. The model code never branches on it.
:class:`UnquantizedLinearMethod` is the 16/32-bit method; on the CPU it stores the weight
transposed (``[in, out]``, see :mod:`gpu_worker.model_executor.layers.linear`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from gpu_worker.model_executor.layers.linear import transposed_linear


class LinearMethod(ABC):
    """Weight layout and matrix product of linear layers."""

    @abstractmethod
    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        """Register the layer's weight parameter(s) for a ``[out_features, in_features]`` shard.

        The checkpoint loader fills ``layer.weight`` (``[out, in]``, the checkpoint's own layout)
        through the layer's ``weight_loader``.
        """

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W^T (+ bias)`` for ``x`` ``[T, in]``."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027 - optional hook
        """Convert the loaded weights into the layout :meth:`apply` reads (once, after loading)."""


class UnquantizedLinearMethod(LinearMethod):
    """Weights in the model dtype. ``transposed`` (the CPU's layout): ``weight_t`` ``[in, out]``
    replaces ``weight`` after loading, which the CPU multiplies faster at batch 1."""

    def __init__(self, transposed: bool = False) -> None:
        self.transposed = transposed

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.transposed:
            return transposed_linear(x, _param(layer, "weight_t"), bias)
        return nn.functional.linear(x, _param(layer, "weight"), bias)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not self.transposed or not hasattr(layer, "weight"):
            return
        weight = _param(layer, "weight")
        if "weight" in layer._parameters:  # a tied LM head reads its embedding's: nothing to drop
            del layer.weight
        layer.weight_t = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)


def _param(layer: nn.Module, name: str) -> torch.Tensor:
    value: torch.Tensor = getattr(layer, name)
    return value
