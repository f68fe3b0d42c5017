"""Mixture-of-experts Llama-style decoders: Mixtral, Qwen2-MoE, Qwen3-MoE.

Attention, norms, embeddings and the pipeline/tensor split are the Llama decoder's
(``llama.py``); the sparse layers' MLP is a :class:`SparseMoeBlock`: the router and the experts
(``layers/fused_moe.py``), plus Qwen2-MoE's shared expert behind its sigmoid gate. Which layers
are sparse is the config's (Qwen's ``decoder_sparse_step`` and ``mlp_only_layers``; every layer for
Mixtral). Weights come from 16/32-bit checkpoints, served as they are or, with ``--quantization
fp8``, quantized to e4m3 experts as they load (the attention's projections as any fp8 model's);
pre-quantized MoE checkpoints are refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from gpu_worker.model_executor.layers.fused_moe import FusedMoE
from gpu_worker.model_executor.layers.quantization.base import UnquantizedLinearMethod
from gpu_worker.model_executor.layers.quantization.fp8 import Fp8LinearMethod
from gpu_worker.model_executor.model_config import MoeShape, is_sparse_layer, moe_shape
from gpu_worker.model_executor.models.llama import (
    BuildContext,
    DecoderFlags,
    DecoderMLP,
    LlamaForCausalLM,
    Qwen2ForCausalLM,
)
from gpu_worker.model_executor.models.qwen3 import Qwen3ForCausalLM
from gpu_worker.model_executor.weights import TensorSource

# A sparse layer's router and experts as checkpoints name them (Mixtral's block_sparse_moe,
# Qwen's mlp), per expert or stacked (transformers 5).
_MOE_TENSOR = re.compile(r"(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.(gate\.weight|experts\..+)")


class SparseMoeBlock(nn.Module):
    """A sparse layer's MLP: ``moe`` (router + experts), and with a shared expert in ``shape``
    (Qwen2-MoE's), that expert added after ``sigmoid(shared_expert_gate(x))`` scales it."""

    def __init__(self, cfg: Any, flags: DecoderFlags, ctx: BuildContext, prefix: str, shape: MoeShape
                 ) -> None:
        super().__init__()
        method = ctx.linear(f"{prefix}.experts")
        fp8 = isinstance(method, Fp8LinearMethod) and method.checkpoint is None
        if not (fp8 or isinstance(method, UnquantizedLinearMethod)):
            raise ValueError("quantization: mixture-of-experts models are served from 16/32-bit "
                             "checkpoints, as they are or quantized to fp8 as they load (--quantization "
                             "fp8); pre-quantized MoE checkpoints (fp8, GPTQ, AWQ, GGUF) are not")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} (only silu)")
        self.moe = FusedMoE(shape.num_experts, shape.top_k, cfg.hidden_size, shape.intermediate_size,
                            renormalize=shape.renormalize, dtype=ctx.dtype, tp=ctx.parallel.tp, ops=ctx.ops,
                            fp8=fp8)
        self.shared_expert: DecoderMLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if shape.shared_intermediate_size:
            self.shared_expert = DecoderMLP(cfg, flags, ctx, f"{prefix}.shared_expert",
                                            shape.shared_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False, dtype=ctx.dtype)
            self.shared_expert_gate.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.moe(x)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def sparse_mlp(cfg: Any, flags: DecoderFlags, ctx: BuildContext, index: int, prefix: str) -> nn.Module | None:
    """The MLP of layer ``index``: a :class:`SparseMoeBlock` where the config makes it sparse,
    else None (the dense MLP)."""
    shape = moe_shape(cfg)
    if shape is None or not is_sparse_layer(cfg, index):
        return None
    return SparseMoeBlock(cfg, flags, ctx, prefix, shape)


class MoeForCausalLM(LlamaForCausalLM):
    """What every MoE family shares: sparse layers where the config says (:func:`sparse_mlp`),
    router and expert tensors loaded into their :class:`FusedMoE`, everything else as in a Llama
    decoder."""

    build_mlp = staticmethod(sparse_mlp)

    def load_weights(self, weights: Iterable[tuple[str, TensorSource]]) -> set[str]:
        experts = {name: m for name, m in self.named_modules() if isinstance(m, FusedMoE)}
        loaded: set[str] = set()

        def dense(pairs: Iterable[tuple[str, TensorSource]]) -> Iterator[tuple[str, TensorSource]]:
            for name, source in pairs:
                match = _MOE_TENSOR.fullmatch(name)
                if match is None:
                    yield name, source
                    continue
                prefix = f"{match.group(1)}.mlp.moe"
                module = experts.get(prefix)
                if module is not None:  # None: a layer of another pipeline stage
                    loaded.update(f"{prefix}.{n}" for n in module.load(match.group(2), source))

        loaded |= super().load_weights(dense(weights))
        return loaded


class MixtralForCausalLM(MoeForCausalLM):
    """Mixtral: a Mistral decoder whose every MLP is sparse (top-k renormalized)."""


class Qwen3MoeForCausalLM(MoeForCausalLM):
    """Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm), sparse layers as the config says."""

    flags_for = staticmethod(Qwen3ForCausalLM.flags_for)


class Qwen2MoeForCausalLM(MoeForCausalLM):
    """Qwen2-MoE: Qwen2's attention (q/k/v bias), sparse layers with a shared expert."""

    flags_for = staticmethod(Qwen2ForCausalLM.flags_for)
