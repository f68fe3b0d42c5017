"""How a linear layer stores its weight and multiplies by it: the seam quantization plugs into.

A :class:`LinearMethod` is chosen at load time for each linear layer (ARCHITECTURE: quantization
is a property of a linear layer): it creates the layer's weight parameters, copies this rank's
part of each checkpoint tensor into them (:meth:`LinearMethod.load_weight`, converting where the
layout differs), finishes the conversion once the checkpoint is loaded, and performs the
product. The model code never branches on it. :class:`UnquantizedLinearMethod` is the
16/32-bit method; on the CPU it stores the weight transposed (``[in, out]``, see
:mod:`gpu_worker.model_executor.layers.linear`). The quantized ones live next to this module
(``fp8.py``, ``wna16.py``; docs/QUANTIZATION.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from gpu_worker.model_executor.layers.linear import transposed_linear
from gpu_worker.model_executor.weights import TensorSource
from kernels import KernelOps
from kernels.rope_store import RopeStore


@dataclass(frozen=True)
class WeightShard:
    """The part of a checkpoint weight (``[out, in]``) that this rank's layer holds.

    ``dim`` 0 (column-parallel): checkpoint rows ``[start, start + length)`` of fused
    sub-matrix ``index`` (q/k/v, gate/up) go to the layer's rows ``[dst, dst + length)``, all
    columns. ``dim`` 1 (row-parallel): checkpoint columns ``[start, start + length)``, all rows.
    """

    dim: int
    start: int
    length: int
    dst: int = 0
    index: int = 0

    def read(self, source: TensorSource) -> torch.Tensor:
        """This rank's slice of ``source`` (rows for ``dim`` 0, columns for ``dim`` 1)."""
        return source.narrow(self.dim, self.start, self.length)


class LinearMethod(ABC):
    """Weight layout and matrix product of linear layers."""

    # Whether apply() also takes an Fp8Activation (activations quantized by the op before it).
    takes_fp8_activation = False

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

    def apply_gated(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """``silu_and_mul(apply(layer, x, bias))`` for a ``[gate; up]`` layer and ``x`` of one token
        (``MergedColumnParallelLinear.gated`` asks only then), when this method has a fused kernel
        (the one-token GEMVs: the activation in their epilogue); None otherwise, and the caller
        runs :meth:`apply` and the activation."""
        return None

    def apply_rope(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, rope: RopeStore
    ) -> torch.Tensor | None:
        """For a ``[q; k; v]`` layer and ``x`` of one token (``QKVParallelLinear.rotate_and_store``
        asks only then): the rotated q ``[1, Hq * D]``, with the rotated k and v already stored in
        ``rope``'s cache, when this method has a fused kernel (rotary + K/V store in the one-token
        GEMV's epilogue); None otherwise, and the caller runs :meth:`apply`, then rotary + store."""
        return None

    def load_weight(
        self, layer: nn.Module, name: str, source: TensorSource, shard: WeightShard
    ) -> Iterable[str]:
        """Copy ``shard`` of checkpoint tensor ``name`` (``weight``, or one of
        :meth:`checkpoint_names`) into the layer; returns the names of the parameters it filled.

        The default copies into parameter ``name`` as it is (the 16/32-bit layout)."""
        target: torch.Tensor = getattr(layer, name)
        with torch.no_grad():
            if shard.dim == 0:
                target.narrow(0, shard.dst, shard.length).copy_(shard.read(source))
            else:
                target.copy_(shard.read(source))
        return (name,)

    def checkpoint_names(self) -> frozenset[str]:
        """Checkpoint tensor names of a linear layer (``q_proj.<name>``) that this method loads
        although the layer has no parameter of that name (``qzeros``, ``input_scale``, ...)."""
        return frozenset()

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027 - optional hook
        """Convert the loaded weights into the layout :meth:`apply` reads (once, after loading)."""

    def fill_random(self, layer: nn.Module, seed: int, std: float) -> bool:
        """Random ("dummy") weights of about ``std`` drawn directly in this method's layout;
        False: the method has none of its own and the parameters are drawn like any other."""
        return False


class UnquantizedLinearMethod(LinearMethod):
    """Weights in the model dtype. ``transposed`` (the CPU's layout): ``weight_t`` ``[in, out]``
    replaces ``weight`` after loading, which the CPU multiplies faster at batch 1. ``gated``:
    the op set's one-token ``[gate; up]`` GEMV with SiLU-and-mul in its epilogue
    (``KernelOps.linear16_gated``; None: the MLP runs the product and the activation).
    ``one_token``: the op set's one-token GEMV (``KernelOps.linear16``) for inputs of one token
    (None: torch's linear at every size). ``rope``: the op set's one-token ``[q; k; v]`` GEMV with
    rotary and the K/V store in its epilogue (``KernelOps.linear16_rope``; :meth:`apply_rope`)."""

    def __init__(self, transposed: bool = False, gated: Callable[..., torch.Tensor] | None = None,
                 one_token: Callable[..., torch.Tensor] | None = None,
                 rope: Callable[..., torch.Tensor | None] | None = None) -> None:
        self.transposed = transposed
        self.gated = gated
        self.one_token = one_token
        self.rope = rope

    @classmethod
    def for_ops(cls, ops: KernelOps, device: torch.device) -> UnquantizedLinearMethod:
        """The plain method on ``device`` with ``ops``' one-token kernels (the CPU's transposed
        layout uses neither)."""
        if device.type == "cpu":
            return cls(transposed=True)
        return cls(gated=ops.linear16_gated, one_token=ops.linear16, rope=ops.linear16_rope)

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.transposed:
            return transposed_linear(x, param(layer, "weight_t"), bias)
        if self.one_token is not None and x.numel() == x.shape[-1]:
            return self.one_token(x, param(layer, "weight"), bias)
        return nn.functional.linear(x, param(layer, "weight"), bias)

    def apply_gated(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        if self.gated is None or self.transposed:
            return None
        return self.gated(x, param(layer, "weight"), bias)

    def apply_rope(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, rope: RopeStore
    ) -> torch.Tensor | None:
        if self.rope is None or self.transposed:
            return None
        return self.rope(x, param(layer, "weight"), bias, rope)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not self.transposed or not hasattr(layer, "weight"):
            return
        weight = param(layer, "weight")
        if "weight" in layer._parameters:  # a tied LM head reads its embedding's: nothing to drop
            del layer.weight
        layer.weight_t = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)


def param(layer: nn.Module, name: str) -> torch.Tensor:
    value: torch.Tensor = getattr(layer, name)
    return value
