"""RMSNorm through the kernel ops (optionally fused with the residual add)."""

from __future__ import annotations

import torch
from torch import nn

from kernels import KernelOps


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; ``forward(x, residual)`` also returns the new residual."""

    def __init__(
        self, hidden_size: int, eps: float, ops: KernelOps, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps
        self.ops = ops

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        out, summed = self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return out, summed
