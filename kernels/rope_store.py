"""What a fused one-token ``[q; k; v]`` linear needs to rotate q and k and store k and v into the
paged cache in its own epilogue (``KernelOps.wna16_rope_linear``), in place of the linear followed
by ``rotary_store_kvcache``. No Triton here: the engine builds it on any device."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeStore:
    """One token's rotary and K/V store, as ``rotary_store_kvcache`` takes them: NeoX (rotate-half)
    rotation over the whole head dim, a 16/32-bit cache (contiguous ``[blocks, block, Hk, D]``
    halves). The linear's weight is ``[q; k; v]``: ``num_q_heads`` then twice ``num_kv_heads``
    heads of ``head_dim`` rows."""

    positions: torch.Tensor  # [1]
    cos_sin: torch.Tensor  # [max_positions, head_dim] float32: cos then sin
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    slot_mapping: torch.Tensor  # [1]; negative: no K/V store
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    def applies(self, n: int) -> bool:
        """Whether an ``[n, K]`` weight is this layer's ``[q; k; v]`` and the inputs fit the fused
        kernel (one token, an even head dim, a 16/32-bit contiguous cache, a unit-stride table)."""
        d = self.head_dim
        return (d % 2 == 0 and n == (self.num_q_heads + 2 * self.num_kv_heads) * d
                and self.positions.numel() == 1 and self.slot_mapping.numel() == 1
                and self.key_cache.is_contiguous() and self.value_cache.is_contiguous()
                and self.key_cache.element_size() >= 2 and self.value_cache.element_size() >= 2
                and self.cos_sin.dim() == 2 and self.cos_sin.shape[1] == d and self.cos_sin.stride(-1) == 1)
