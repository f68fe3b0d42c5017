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


@dataclass(frozen=True)
class MoeShape:
    """A mixture-of-experts model's sparse MLP: ``num_experts`` of ``intermediate_size`` each,
    ``top_k`` per token (renormalized when ``renormalize``), and Qwen2-MoE's shared expert of
    ``shared_intermediate_size`` (0: none)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool
    shared_intermediate_size: int = 0


def moe_shape(hf_config: Any) -> MoeShape | None:
    """The config's sparse MLP (Mixtral, Qwen2-MoE, Qwen3-MoE names), None for a dense model."""
    experts = int(getattr(hf_config, "num_experts", 0) or getattr(hf_config, "num_local_experts", 0) or 0)
    if not experts:
        return None
    return MoeShape(
        num_experts=experts,
        top_k=int(hf_config.num_experts_per_tok),
        intermediate_size=int(getattr(hf_config, "moe_intermediate_size", 0) or hf_config.intermediate_size),
        renormalize=bool(getattr(hf_config, "norm_topk_prob", True)),  # Mixtral always renormalizes
        shared_intermediate_size=int(getattr(hf_config, "shared_expert_intermediate_size", 0) or 0),
    )


def is_sparse_layer(hf_config: Any, index: int) -> bool:
    """Whether layer ``index`` has the sparse MLP (HF's rule: every ``decoder_sparse_step``-th
    layer but the ``mlp_only_layers``; every layer of Mixtral)."""
    if moe_shape(hf_config) is None:
        return False
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    return index not in (getattr(hf_config, "mlp_only_layers", None) or []) and (index + 1) % step == 0
