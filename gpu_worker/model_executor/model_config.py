"""Shape facts read from an HF config, shared by the models, the loader, KV sizing and the runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def head_dim_of(hf_config: Any) -> int:
    """``head_dim`` from the config when given, else hidden_size / num_attention_heads."""
    return int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads)


def max_context_len(hf_config: Any) -> int:
    """The longest sequence we serve exactly: ``max_position_embeddings``, capped by the
    attention window when the config enables sliding-window attention (Mistral). Our attention
    is full causal, which equals sliding-window attention only within the window."""
    limit = int(hf_config.max_position_embeddings)
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        limit = min(limit, int(window))
    return limit


@dataclass(frozen=True)
class KVCacheSpec:
    """The KV cache one rank keeps: ``num_layers`` caches (its pipeline stage's layers) of
    ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (its tensor-parallel share of heads)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_block(self, block_size: int, element_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size * block_size
