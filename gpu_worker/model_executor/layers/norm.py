"""RMSNorm through the kernel ops (optionally fused with the residual add)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kernels import KernelOps


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; ``forward(x, residual)`` also returns the new residual.

    With ``fp8_out`` set (by the model, when the one consumer of the output is an fp8 W8A8
    linear) the output is an :class:`~kernels.quant_reference.Fp8Activation`: the norm and the
    per-token quantization in one kernel, the same codes as quantizing in the linear."""

    def __init__(
        self, hidden_size: int, eps: float, ops: KernelOps, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps
        self.ops = ops
        self.fp8_out = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        ops = self.ops
        # Steps the fp8 linear runs weight-only (one-token decode) take the 16-bit output.
        fp8_out = self.fp8_out and not ops.fp8_weight_only(x.numel() // x.shape[-1])
        if residual is None:
            norm = ops.rms_norm_fp8 if fp8_out and ops.rms_norm_fp8 is not None else ops.rms_norm
            return norm(x, self.weight, self.eps)
        add_norm = ops.fused_add_rms_norm
        if fp8_out and ops.fused_add_rms_norm_fp8 is not None:
            add_norm = ops.fused_add_rms_norm_fp8
        out, summed = add_norm(x, residual, self.weight, self.eps)
        return out, summed
