"""Gated activations through the kernel ops."""

from __future__ import annotations

import torch
from torch import nn

from kernels import KernelOps


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` (the SwiGLU gate of a fused gate_up projection)."""

    def __init__(self, ops: KernelOps) -> None:
        super().__init__()
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_and_mul(x)
