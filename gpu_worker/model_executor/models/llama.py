"""Llama-style decoders: Llama 2/3 (SmolLM2, TinyLlama), Mistral, Qwen2, Qwen3.

The families differ only in flags (:class:`DecoderFlags`): biases, per-head q/k RMSNorm.
Projections are fused (``qkv_proj``, ``gate_up_proj``) and tensor-parallel
(``layers/parallel.py``); :meth:`LlamaForCausalLM.load_weights` maps HF's separate tensors into
them, each layer reading only its shard. A pipeline stage builds only its own layers (the
others are :class:`MissingLayer` placeholders, so parameter names keep HF's layer numbers); the
first stage embeds, the last normalizes and computes logits. Every model is constructed as
``cls(hf_config, ops, dtype, parallel=..., linear=...)`` under a ``torch.device(...)`` context;
with the defaults (one rank, plain 16/32-bit weights) it is exactly the single-GPU model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gpu_worker.distributed.parallel_state import IntermediateTensors, ModelParallel
from gpu_worker.model_executor.layers.activation import SiluAndMul
from gpu_worker.model_executor.layers.attention import AttentionMetadata, PagedAttention
from gpu_worker.model_executor.layers.norm import RMSNorm
from gpu_worker.model_executor.layers.parallel import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from gpu_worker.model_executor.layers.quantization.base import LinearMethod, UnquantizedLinearMethod
from gpu_worker.model_executor.layers.rotary import RotaryEmbedding
from gpu_worker.model_executor.model_config import KVCacheSpec, head_dim_of
from gpu_worker.model_executor.weights import TensorSource
from kernels import KernelOps

# The linear method of the layer at a parameter-name prefix ("model.layers.3.self_attn.qkv_proj").
LinearMethods = Callable[[str], LinearMethod]


def plain_linear(prefix: str) -> LinearMethod:
    return UnquantizedLinearMethod()


# KV-cache scales as fp8 checkpoints name them (vLLM's names: compressed-tensors writes
# k_proj/v_proj.output_scale or self_attn.k_scale, ModelOpt k_proj.k_scale, older ones one kv_scale).
_KV_SCALE = re.compile(
    r"(model\.layers\.\d+\.self_attn)\.(?:attn\.)?"
    r"(k_scale|v_scale|kv_scale|k_proj\.output_scale|v_proj\.output_scale|k_proj\.k_scale|v_proj\.v_scale)"
)
_KV_SCALE_TARGETS = {
    "k_scale": ("k_scale",), "v_scale": ("v_scale",), "kv_scale": ("k_scale", "v_scale"),
    "k_proj.output_scale": ("k_scale",), "v_proj.output_scale": ("v_scale",),
    "k_proj.k_scale": ("k_scale",), "v_proj.v_scale": ("v_scale",),
}


@dataclass(frozen=True)
class DecoderFlags:
    """What distinguishes one Llama-like family from another."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


@dataclass(frozen=True)
class BuildContext:
    """What every layer of one model is built with."""

    ops: KernelOps
    dtype: torch.dtype
    parallel: ModelParallel = field(default_factory=ModelParallel)
    linear: LinearMethods = plain_linear


def _is_tied(hf_config: Any) -> bool:
    return bool(getattr(hf_config, "tie_word_embeddings", False))


class DecoderAttention(nn.Module):
    def __init__(
        self, cfg: Any, flags: DecoderFlags, rotary: RotaryEmbedding, ctx: BuildContext, prefix: str
    ) -> None:
        super().__init__()
        tp = ctx.parallel.tp
        head_dim = head_dim_of(cfg)
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, bias=flags.qkv_bias,
            dtype=ctx.dtype, tp=tp, method=ctx.linear(f"{prefix}.qkv_proj"),
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * head_dim, cfg.hidden_size, bias=flags.o_bias, dtype=ctx.dtype, tp=tp,
            method=ctx.linear(f"{prefix}.o_proj"),
        )
        self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps, ctx.ops, ctx.dtype) if flags.qk_norm else None
        self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps, ctx.ops, ctx.dtype) if flags.qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5, ctx.ops,
            kv_head_start=self.qkv_proj.kv_head_start, total_kv_heads=cfg.num_key_value_heads,
        )

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, md: AttentionMetadata, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        if num_tokens == 1 and self.q_norm is None and md.piecewise is None and not self.attn.calibrate:
            # One token: the qkv GEMV may rotate and store K/V in its own epilogue (one launch
            # fewer in the decode chain; the same bits as the linear then rotate_and_store).
            rope = self.rotary.rope_store(positions, kv_cache, md, self.num_heads, self.num_kv_heads)
            q_rot = self.qkv_proj.rotate_and_store(hidden, rope) if rope is not None else None
            if q_rot is not None:
                out = self.attn.attend(q_rot.view(1, self.num_heads, self.head_dim), kv_cache, md)
                return self.o_proj(out.reshape(1, self.q_size))
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # One launch rotates and stores, attention reads the cache; not while the attention
        # computes its fp8 KV scales (first real forward), which it does from the rotated K.
        if self.rotary.stores_kv and not self.attn.calibrate:
            scales = self.attn.kv_scales(kv_cache)
            q = self.rotary.rotate_and_store(positions, q, k, v, kv_cache, md, **scales)
            out = self.attn.attend(q, kv_cache, md)
        else:
            q, k = self.rotary(positions, q, k, md)
            out = self.attn(q, k, v, kv_cache, md)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class DecoderMLP(nn.Module):
    def __init__(self, cfg: Any, flags: DecoderFlags, ctx: BuildContext, prefix: str,
                 intermediate_size: int | None = None) -> None:
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} (only silu)")
        size, tp = intermediate_size or cfg.intermediate_size, ctx.parallel.tp
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [size, size], bias=flags.mlp_bias, dtype=ctx.dtype, tp=tp,
            method=ctx.linear(f"{prefix}.gate_up_proj"),
        )
        self.down_proj = RowParallelLinear(
            size, cfg.hidden_size, bias=flags.mlp_bias, dtype=ctx.dtype, tp=tp,
            method=ctx.linear(f"{prefix}.down_proj"),
        )
        self.act = SiluAndMul(ctx.ops)
        # The product is down_proj's only input: quantized with the activation when it is fp8.
        self.act.fp8_out = self.down_proj.linear_method.takes_fp8_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One token on a fused kernel: SiLU-and-mul in gate_up's GEMV epilogue (the same bits).
        if isinstance(x, torch.Tensor) and not self.act.quantizes(x.numel() // x.shape[-1]):
            h = self.gate_up_proj.gated(x)
            if h is not None:
                return self.down_proj(h)
        return self.down_proj(self.act(self.gate_up_proj(x)))


# The MLP of the layer at a parameter-name prefix ("model.layers.3"), or None for the dense one
# (a mixture-of-experts family builds its sparse layers here: models/moe.py).
MlpBuilder = Callable[[Any, DecoderFlags, BuildContext, int, str], nn.Module | None]


def dense_mlp(cfg: Any, flags: DecoderFlags, ctx: BuildContext, index: int, prefix: str) -> nn.Module | None:
    return None


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: Any, flags: DecoderFlags, rotary: RotaryEmbedding, ctx: BuildContext, prefix: str,
        mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(cfg, flags, rotary, ctx, f"{prefix}.self_attn")
        self.mlp = mlp if mlp is not None else DecoderMLP(cfg, flags, ctx, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.ops, ctx.dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.ops, ctx.dtype)
        # Each norm's output feeds one projection only (qkv, gate_up): an fp8 one takes it
        # quantized by the norm kernel (kernels.quant_reference.Fp8Activation).
        self.input_layernorm.fp8_out = self.self_attn.qkv_proj.linear_method.takes_fp8_activation
        gate_up = getattr(self.mlp, "gate_up_proj", None)  # a sparse MLP's experts take no fp8 input
        self.post_attention_layernorm.fp8_out = (gate_up is not None
                                                 and gate_up.linear_method.takes_fp8_activation)

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


class MissingLayer(nn.Module):
    """A layer another pipeline stage holds: no parameters, never called."""


class DecoderModel(nn.Module):
    def __init__(self, cfg: Any, flags: DecoderFlags, ctx: BuildContext, build_mlp: MlpBuilder = dense_mlp
                 ) -> None:
        super().__init__()
        parallel = ctx.parallel
        self.start, self.end = parallel.layers(cfg.num_hidden_layers)
        self.embed_tokens: VocabParallelEmbedding | None = None
        if parallel.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(
                cfg.vocab_size, cfg.hidden_size, dtype=ctx.dtype, tp=parallel.tp
            )
        # One cos/sin cache shared by all layers (registered once, under the first layer's path).
        rotary = RotaryEmbedding(cfg, head_dim_of(cfg), cfg.max_position_embeddings, ctx.ops)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, flags, rotary, ctx, f"model.layers.{i}",
                         build_mlp(cfg, flags, ctx, i, f"model.layers.{i}.mlp")) if self.start <= i < self.end
            else MissingLayer()
            for i in range(cfg.num_hidden_layers)
        )
        self.norm: RMSNorm | None = None
        if parallel.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.ops, ctx.dtype)


class LlamaForCausalLM(nn.Module):
    """Llama decoder (also Mistral; Qwen2/Qwen3 through subclasses that change the flags)."""

    @staticmethod
    def flags_for(hf_config: Any) -> DecoderFlags:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderFlags(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))

    # The family's MLP per layer (dense: None); a mixture-of-experts subclass overrides it.
    build_mlp: MlpBuilder = staticmethod(dense_mlp)

    def __init__(
        self,
        hf_config: Any,
        ops: KernelOps,
        dtype: torch.dtype = torch.float32,
        parallel: ModelParallel | None = None,
        linear: LinearMethods = plain_linear,
    ) -> None:
        super().__init__()
        ctx = BuildContext(ops, dtype, parallel or ModelParallel(), linear)
        self.config = hf_config
        self.parallel = ctx.parallel
        self.model = DecoderModel(hf_config, self.flags_for(hf_config), ctx, self.build_mlp)
        self.lm_head: ParallelLMHead | None = None
        if ctx.parallel.is_last_stage:
            # A tied head shares the embedding's shard when this stage has it; a last stage
            # without the embedding (pipeline parallel) loads its own copy of it.
            # A tied head multiplies by the embedding's (16-bit) weight: its method is the
            # embedding's, not the one a quantized checkpoint's own head would take.
            tied = _is_tied(hf_config)
            self.lm_head = ParallelLMHead(
                hf_config.vocab_size, hf_config.hidden_size, dtype=dtype, tp=ctx.parallel.tp,
                method=linear("embed_tokens" if tied else "lm_head"),
                tied=self.model.embed_tokens if tied else None,
            )

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        """This rank's KV cache: one per layer of its stage, its share of the KV heads."""
        layer = self.model.layers[self.model.start]
        assert isinstance(layer, DecoderLayer)  # invariant: the stage's own layers are built
        attn = layer.self_attn
        return KVCacheSpec(self.model.end - self.model.start, attn.num_kv_heads, attn.head_dim)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_caches: list[torch.Tensor],
        intermediate: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """``input_ids`` (first stage) or the previous stage's ``intermediate``, ``positions``
        ``[T]`` -> final hidden states ``[T, H]`` (last stage) or this stage's intermediate.

        ``kv_caches[i]`` is the ``[2, num_blocks, block_size, Hk, D]`` cache of this stage's
        ``i``-th layer. ``inputs_embeds`` (first stage): the ``[T, H]`` input embeddings instead
        of the ids' (a step with image features in place of image tokens).
        """
        residual: torch.Tensor | None
        if inputs_embeds is not None:
            hidden, residual = inputs_embeds, None
        elif self.model.embed_tokens is not None:
            hidden, residual = self.model.embed_tokens(input_ids), None
        else:
            assert intermediate is not None  # invariant: later stages receive the previous one's
            hidden, residual = intermediate.hidden, intermediate.residual
        layers = self.model.layers[self.model.start : self.model.end]
        for layer, kv_cache in zip(layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, attn_metadata, kv_cache)
        if self.model.norm is None:
            assert residual is not None  # invariant: a stage computes at least one layer
            return IntermediateTensors(hidden, residual)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[T]`` -> the token embeddings ``[T, H]`` (first pipeline stage only)."""
        if self.model.embed_tokens is None:
            raise RuntimeError("only the first pipeline stage embeds tokens")
        embeds: torch.Tensor = self.model.embed_tokens(input_ids)
        return embeds

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``[N, H]`` -> logits ``[N, V]`` in the model's dtype on the sampling rank (None on other
        TP ranks; :meth:`ParallelLMHead.compute_logits`)."""
        if self.lm_head is None:
            raise RuntimeError("only the last pipeline stage computes logits")
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, TensorSource]]) -> set[str]:
        """Copy this rank's shard of HF-named tensors into the (fused) parameters; returns the
        parameter names filled. Tensors of other pipeline stages are skipped unread."""
        modules = dict(self.named_modules())
        own = {name for name, _ in self.named_parameters()}
        own |= {name for name, _ in self.named_buffers() if name.endswith((".k_scale", ".v_scale"))}
        loaded: set[str] = set()
        for name, source in weights:
            for target, shard in self._targets(name):
                module_name, _, attr = target.rpartition(".")
                module = modules.get(module_name)
                if module is None or (target not in own and not _claims(module, attr)):
                    continue  # another stage's tensor, or the head a tied embedding serves
                loader = getattr(module, "load", None)
                filled = None
                if loader is not None:
                    filled = loader(attr, source, shard)
                else:
                    with torch.no_grad():
                        getattr(module, attr).copy_(source.full())
                loaded.update([target] if filled is None else [f"{module_name}.{n}" for n in filled])
        return loaded & own

    @property
    def _head_copies_embedding(self) -> bool:
        """A tied LM head on a stage without the embedding (pipeline parallel) loads its own copy."""
        return self.lm_head is not None and self.model.embed_tokens is None and _is_tied(self.config)

    def _targets(self, name: str) -> list[tuple[str, int]]:
        """HF tensor name -> [(our parameter name, fused shard index)]."""
        if "rotary_emb.inv_freq" in name:
            return []
        kv_scale = _KV_SCALE.fullmatch(name)
        if kv_scale is not None:
            return [(f"{kv_scale.group(1)}.attn.{t}", 0) for t in _KV_SCALE_TARGETS[kv_scale.group(2)]]
        if name == "model.embed_tokens.weight" and self._head_copies_embedding:
            return [(name, 0), ("lm_head.weight", 0)]
        fused = {
            ".q_proj.": (".qkv_proj.", 0),
            ".k_proj.": (".qkv_proj.", 1),
            ".v_proj.": (".qkv_proj.", 2),
            ".gate_proj.": (".gate_up_proj.", 0),
            ".up_proj.": (".gate_up_proj.", 1),
        }
        for old, (new, shard) in fused.items():
            if old in name:
                return [(name.replace(old, new), shard)]
        return [(name, 0)]


def _claims(module: nn.Module, attr: str) -> bool:
    """Whether ``module``'s linear method loads checkpoint tensor ``attr`` although the module
    has no parameter of that name (quantized checkpoints: ``qzeros``, ``weight_scale_inv``...)."""
    method = getattr(module, "linear_method", None)
    return isinstance(method, LinearMethod) and attr in method.checkpoint_names()


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: a Llama decoder (sliding-window attention is not applied; exact within the window)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: bias on q/k/v, none on o_proj."""

    @staticmethod
    def flags_for(hf_config: Any) -> DecoderFlags:
        return DecoderFlags(qkv_bias=True, o_bias=False)
