"""Gated activations through the kernel ops."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kernels import KernelOps


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` (the SwiGLU gate of a fused gate_up projection).

    ``fp8_out`` (set by the model when its consumer is an fp8 W8A8 linear): the result comes
    quantized per token, as an :class:`~kernels.quant_reference.Fp8Activation`."""

    def __init__(self, ops: KernelOps) -> None:
        super().__init__()
        self.ops = ops
        self.fp8_out = False

    def quantizes(self, tokens: int) -> bool:
        """Whether the result for ``tokens`` tokens comes fp8-quantized (else 16-bit)."""
        return self.fp8_out and not self.ops.fp8_weight_only(tokens)

    def forward(self, x: torch.Tensor) -> Any:
        fp8_out = self.quantizes(x.numel() // x.shape[-1])
        if fp8_out and self.ops.silu_and_mul_fp8 is not None:
            return self.ops.silu_and_mul_fp8(x)
        return self.ops.silu_and_mul(x)
