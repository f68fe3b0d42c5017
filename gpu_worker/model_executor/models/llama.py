"""Llama-style decoders: Llama 2/3 (SmolLM2, TinyLlama), Mistral, Qwen2, Qwen3.

The families differ only in flags (:class:`DecoderFlags`): biases, per-head q/k RMSNorm.
Projections are fused (``qkv_proj``, ``gate_up_proj``); :meth:`LlamaForCausalLM.load_weights`
maps HF's separate tensors into them. Every model is constructed as
``cls(hf_config, ops, dtype)`` under a ``torch.device(...)`` context.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gpu_worker.model_executor.layers.activation import SiluAndMul
from gpu_worker.model_executor.layers.attention import AttentionMetadata, PagedAttention
from gpu_worker.model_executor.layers.norm import RMSNorm
from gpu_worker.model_executor.layers.rotary import RotaryEmbedding
from gpu_worker.model_executor.model_config import head_dim_of
from kernels import KernelOps


@dataclass(frozen=True)
class DecoderFlags:
    """What distinguishes one Llama-like family from another."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


def _is_tied(hf_config: Any) -> bool:
    return bool(getattr(hf_config, "tie_word_embeddings", False))


class DecoderAttention(nn.Module):
    def __init__(
        self, cfg: Any, flags: DecoderFlags, rotary: RotaryEmbedding, ops: KernelOps, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim_of(cfg)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=flags.qkv_bias, dtype=dtype
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=flags.o_bias, dtype=dtype)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops, dtype) if flags.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops, dtype) if flags.qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, ops)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, md: AttentionMetadata, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary.stores_kv:  # one launch rotates and stores; attention reads the cache
            q = self.rotary.rotate_and_store(positions, q, k, v, kv_cache, md)
            out = self.attn.attend(q, kv_cache, md)
        else:
            q, k = self.rotary(positions, q, k, md)
            out = self.attn(q, k, v, kv_cache, md)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class DecoderMLP(nn.Module):
    def __init__(self, cfg: Any, flags: DecoderFlags, ops: KernelOps, dtype: torch.dtype) -> None:
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} (only silu)")
        size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * size, bias=flags.mlp_bias, dtype=dtype)
        self.down_proj = nn.Linear(size, cfg.hidden_size, bias=flags.mlp_bias, dtype=dtype)
        self.act = SiluAndMul(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: Any, flags: DecoderFlags, rotary: RotaryEmbedding, ops: KernelOps, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(cfg, flags, rotary, ops, dtype)
        self.mlp = DecoderMLP(cfg, flags, ops, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        md: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, md, kv_cache)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: Any, flags: DecoderFlags, ops: KernelOps, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        # One cos/sin cache shared by all layers (registered once, under the first layer's path).
        rotary = RotaryEmbedding(cfg, head_dim_of(cfg), cfg.max_position_embeddings, ops)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, flags, rotary, ops, dtype) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)


class LlamaForCausalLM(nn.Module):
    """Llama decoder (also Mistral; Qwen2/Qwen3 through subclasses that change the flags)."""

    @staticmethod
    def flags_for(hf_config: Any) -> DecoderFlags:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderFlags(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))

    def __init__(self, hf_config: Any, ops: KernelOps, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = hf_config
        self.model = DecoderModel(hf_config, self.flags_for(hf_config), ops, dtype)
        self.lm_head: nn.Module | None = None
        if not _is_tied(hf_config):
            self.lm_head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False, dtype=dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """``input_ids``/``positions`` ``[T]`` -> final hidden states ``[T, H]``.

        ``kv_caches[i]`` is layer ``i``'s ``[2, num_blocks, block_size, Hk, D]`` cache.
        """
        hidden = self.model.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, attn_metadata, kv_cache)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` -> float32 logits ``[N, V]``."""
        if self.lm_head is None:
            logits = nn.functional.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        return logits if logits.dtype == torch.float32 else logits.float()

    def untie_lm_head(self) -> None:
        """Give a tied LM head its own ``nn.Linear`` holding a copy of the embedding (after
        loading), so that weight-layout transforms reach it; costs vocab x hidden memory."""
        if self.lm_head is not None:
            return
        embed = self.model.embed_tokens.weight
        head = nn.Linear(embed.shape[1], embed.shape[0], bias=False, dtype=embed.dtype, device=embed.device)
        with torch.no_grad():
            head.weight.copy_(embed)
        self.lm_head = head.requires_grad_(False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into the (fused) parameters; returns the parameter names filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.lm_head is None and name.startswith("lm_head.")):
                continue
            target, start = self._map_name(name)
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
            param = params[target]
            with torch.no_grad():
                if start is None:
                    param.copy_(tensor)
                else:
                    param[start : start + tensor.shape[0]].copy_(tensor)
            loaded.add(target)
        return loaded

    def _map_name(self, name: str) -> tuple[str, int | None]:
        """HF tensor name -> (our parameter name, row offset inside a fused parameter or None)."""
        cfg = self.config
        head_dim = head_dim_of(cfg)
        q_size = cfg.num_attention_heads * head_dim
        kv_size = cfg.num_key_value_heads * head_dim
        fused = {
            ".q_proj.": (".qkv_proj.", 0),
            ".k_proj.": (".qkv_proj.", q_size),
            ".v_proj.": (".qkv_proj.", q_size + kv_size),
            ".gate_proj.": (".gate_up_proj.", 0),
            ".up_proj.": (".gate_up_proj.", cfg.intermediate_size),
        }
        for old, (new, offset) in fused.items():
            if old in name:
                return name.replace(old, new), offset
        return name, None


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: a Llama decoder (sliding-window attention is not applied; exact within the window)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: bias on q/k/v, none on o_proj."""

    @staticmethod
    def flags_for(hf_config: Any) -> DecoderFlags:
        return DecoderFlags(qkv_bias=True, o_bias=False)
