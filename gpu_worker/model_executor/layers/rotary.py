"""Rotary position embedding with HF's exact frequencies, folded into one cos/sin cache.

The inverse frequencies and the attention scaling come from transformers' own rope init
functions (``ROPE_INIT_FUNCTIONS``: linear, llama3, yarn, ...), so every scaling type HF
supports gives HF's numbers. ``dynamic`` rope is evaluated at its original length (exact
within ``original_max_position_embeddings``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gpu_worker.model_executor.layers.attention import AttentionMetadata
from kernels import KernelOps
from kernels.rope_store import RopeStore


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope dict whatever the transformers version (``rope_parameters`` or legacy ``rope_scaling``)."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    return dict(params)


def rope_type(hf_config: Any) -> str:
    params = _rope_parameters(hf_config)
    return str(params.get("rope_type", params.get("type", "default")))


def rope_inv_freq(hf_config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim / 2] float32, attention_scaling)`` exactly as HF computes them."""
    kind = rope_type(hf_config)
    if kind == "default":
        params = _rope_parameters(hf_config)
        base = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        cpu = torch.device("cpu")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=cpu) / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope type {kind!r}; known: {sorted(ROPE_INIT_FUNCTIONS)}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](hf_config, torch.device("cpu"))
    inv_freq = inv_freq.cpu()
    return inv_freq.float(), float(scaling)


def build_cos_sin_cache(hf_config: Any, head_dim: int, max_positions: int) -> torch.Tensor:
    """``[max_positions, head_dim]`` float32 on the CPU: cos in the first half of the columns, sin after."""
    with torch.device("cpu"):  # also under a meta/cuda device context: HF's functions allocate plainly
        inv_freq, scaling = rope_inv_freq(hf_config, head_dim)
    if inv_freq.numel() * 2 != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    # Same float32 product as HF's rotary forward, so cos/sin match HF bit for bit.
    freqs = torch.arange(max_positions, dtype=torch.float, device="cpu")[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates q/k by position with a precomputed float32 cos/sin cache (NeoX / rotate-half style).

    Build it on the target device; the cache stays float32 whatever the model dtype, so do not
    cast the module with ``.to(dtype)``.
    """

    def __init__(self, hf_config: Any, head_dim: int, max_positions: int, ops: KernelOps) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.head_dim = head_dim
        self.max_positions = max_positions
        cache = build_cos_sin_cache(hf_config, head_dim, max_positions)
        self.cos_sin_cache = nn.Buffer(cache.to(torch.get_default_device()), persistent=False)
        self.ops = ops

    def reset_cache(self, device: torch.device) -> None:
        """Recompute the cache on ``device`` (after ``to_empty``, which leaves buffers garbage)."""
        cache = build_cos_sin_cache(self.hf_config, self.head_dim, self.max_positions)
        self.cos_sin_cache = nn.Buffer(cache.to(device), persistent=False)

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        md: AttentionMetadata | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q``/``k`` by ``positions``; with the step's ``md`` (whose positions these
        are), op sets that plan gather the cos/sin rows once per step instead of per layer."""
        plan_op, apply_op = self.ops.plan_rotary_embedding, self.ops.rotary_embedding_with_plan
        if md is None or plan_op is None or apply_op is None:
            return self.ops.rotary_embedding(positions, q, k, self.cos_sin_cache)
        plan = md.plan(f"rotary:{id(self)}", lambda: plan_op(positions, self.cos_sin_cache))
        return apply_op(q, k, plan)  # type: ignore[no-any-return]

    @property
    def stores_kv(self) -> bool:
        """Whether the op set fuses rotary with the K/V store (:meth:`rotate_and_store`)."""
        return self.ops.rotary_store_kvcache is not None

    def rope_store(self, positions: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata,
                   num_q_heads: int, num_kv_heads: int) -> RopeStore | None:
        """What a one-token ``[q; k; v]`` linear needs to rotate and store in its own epilogue
        (``QKVParallelLinear.rotate_and_store``), or None where the op set has no fused rotary +
        store (:attr:`stores_kv`). Whether a cache or table fits the fused kernel is the op's to
        say (``gemv.rope_fits``: it returns None, and the layer runs the linear, then rotary)."""
        if not self.stores_kv:
            return None
        return RopeStore(positions, self.cos_sin_cache, kv_cache[0], kv_cache[1], md.slot_mapping,
                         num_q_heads, num_kv_heads, self.head_dim)

    def rotate_and_store(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
        **kv_scales: torch.Tensor,
    ) -> torch.Tensor:
        """Rotate ``q``/``k`` by ``positions`` and write the rotated ``k`` and ``v`` into
        ``kv_cache`` (``[2, blocks, block, Hk, D]``) at ``md.slot_mapping``, in one op; returns
        the rotated ``q``. The attention then only attends (``PagedAttention.attend``).
        ``kv_scales``: ``k_scale``/``v_scale`` of an fp8 cache (``PagedAttention.kv_scales``).
        Only when :attr:`stores_kv`."""
        op = self.ops.rotary_store_kvcache
        if op is None:
            raise RuntimeError(f"op set {self.ops.name!r} has no rotary_store_kvcache")
        out: torch.Tensor = op(
            positions, q, k, v, self.cos_sin_cache, kv_cache[0], kv_cache[1], md.slot_mapping, **kv_scales
        )
        return out
