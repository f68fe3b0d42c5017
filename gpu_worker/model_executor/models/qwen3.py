"""Qwen3: a Llama decoder with RMSNorm on each q/k head before rotary."""

from __future__ import annotations

from typing import Any

from gpu_worker.model_executor.models.llama import DecoderFlags, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 (dense): per-head q/k RMSNorm; biases as ``attention_bias`` says."""

    @staticmethod
    def flags_for(hf_config: Any) -> DecoderFlags:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderFlags(qkv_bias=bias, o_bias=bias, qk_norm=True)
