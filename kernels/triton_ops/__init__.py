"""llmserve's Triton kernels, one per op of :mod:`kernels.reference`, same signatures.

Each kernel module is small and self-contained; :func:`triton_ops` bundles them into the
:class:`kernels.KernelOps` that :func:`kernels.get_ops` hands out on CUDA. Some ops take
extra keyword-only arguments (``out=``, tiling) that the reference does not have; callers
that stick to the reference signature get the defaults.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

# Triton 3.10 compiles without FP fusion (FMA contraction) unless told otherwise; every kernel
# here was checked against its reference and timed with it on (Triton 3.4-3.9's default). Keep
# it on, unless the user's environment chooses (read by Triton when a kernel compiles).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from kernels import FP8_WEIGHT_ONLY_MAX_M, KernelOps
from kernels.triton_ops.activation import silu_and_mul, silu_and_mul_fp8
from kernels.triton_ops.decode_attention import DecodeConfig, paged_decode_attention
from kernels.triton_ops.fp8_block import (
    fp8_block_linear,
    fp8_block_weight_only_gated_linear,
    fp8_block_weight_only_linear,
)
from kernels.triton_ops.fp8_matmul import (
    Fp8LinearConfig,
    fp8_linear,
    fp8_weight_only_gated_linear,
    fp8_weight_only_linear,
    fp8_weight_only_rope_linear,
    quantize_fp8_per_token,
)
from kernels.triton_ops.gather import gather_columns
from kernels.triton_ops.gemv import gemv16_gated_linear, gemv16_linear, gemv16_rope_linear
from kernels.triton_ops.kv_store import store_kvcache
from kernels.triton_ops.lora import lora_expand, lora_shrink
from kernels.triton_ops.moe import fused_moe
from kernels.triton_ops.norm import fused_add_rms_norm, fused_add_rms_norm_fp8, rms_norm, rms_norm_fp8
from kernels.triton_ops.prefill_attention import PrefillConfig, paged_attention
from kernels.triton_ops.rotary import rotary_embedding
from kernels.triton_ops.rotary_kv import rotary_store_kvcache
from kernels.triton_ops.wna16 import (
    WnA16Config,
    m1_counters,
    wna16_gated_linear,
    wna16_linear,
    wna16_rope_linear,
)

__all__ = [
    "DecodeConfig",
    "Fp8LinearConfig",
    "PrefillConfig",
    "WnA16Config",
    "fp8_block_linear",
    "fp8_block_weight_only_gated_linear",
    "fp8_block_weight_only_linear",
    "fp8_linear",
    "fp8_weight_only_gated_linear",
    "fp8_weight_only_linear",
    "fp8_weight_only_rope_linear",
    "fused_add_rms_norm",
    "fused_add_rms_norm_fp8",
    "fused_moe",
    "gather_columns",
    "gemv16_gated_linear",
    "gemv16_linear",
    "gemv16_rope_linear",
    "lora_expand",
    "lora_shrink",
    "paged_attention",
    "paged_decode_attention",
    "quantize_fp8_per_token",
    "rms_norm",
    "rms_norm_fp8",
    "rotary_embedding",
    "rotary_store_kvcache",
    "silu_and_mul",
    "silu_and_mul_fp8",
    "store_kvcache",
    "triton_ops",
    "wna16_gated_linear",
    "wna16_linear",
    "wna16_rope_linear",
]


def triton_ops(fp8_weight_only_max_m: int = FP8_WEIGHT_ONLY_MAX_M, pdl: bool = False) -> KernelOps:
    """The Triton implementation of every op (CUDA tensors; CPU under ``TRITON_INTERPRET=1``);
    ``fp8_weight_only_max_m`` as in :class:`kernels.KernelOps`. ``pdl`` (sm_90+ only,
    :func:`~kernels.triton_ops.pdl.pdl_supported`): the ops of a one-token decode step (norms,
    one-token linears, act-order's input gather, rotary + KV store, decode attention) launch with
    programmatic dependent launch, each kernel's start overlapping the end of the one before
    (:mod:`kernels.triton_ops.pdl`; what they read before their wait, weights and the host's
    step inputs, must not be written by any kernel of the step, as no model weight is)."""

    def chained(fn: Callable[..., Any]) -> Callable[..., Any]:
        return functools.partial(fn, pdl=True) if pdl else fn

    return KernelOps(
        name="triton",
        rms_norm=chained(rms_norm),
        fused_add_rms_norm=chained(fused_add_rms_norm),
        silu_and_mul=silu_and_mul,
        rotary_embedding=rotary_embedding,
        store_kvcache=store_kvcache,
        paged_attention=paged_attention,
        paged_decode_attention=chained(paged_decode_attention),
        quantize_fp8_per_token=quantize_fp8_per_token,
        fp8_linear=fp8_linear,
        wna16_linear=chained(wna16_linear),
        wna16_split_counters=m1_counters,
        rotary_store_kvcache=chained(rotary_store_kvcache),
        rms_norm_fp8=chained(rms_norm_fp8),
        fused_add_rms_norm_fp8=chained(fused_add_rms_norm_fp8),
        silu_and_mul_fp8=silu_and_mul_fp8,
        fp8_weight_only_linear=chained(fp8_weight_only_linear),
        fp8_weight_only_max_m=fp8_weight_only_max_m,
        # SiLU-and-mul in the one-token fp8 gate_up GEMV: W2 fp8 1% faster on an H200 since the
        # GEMV sums per thread (DECISIONS 133; slower before it, docs/QUANTIZATION.md).
        fp8_weight_only_gated_linear=chained(fp8_weight_only_gated_linear),
        wna16_gated_linear=chained(wna16_gated_linear),
        wna16_rope_linear=chained(wna16_rope_linear),
        linear16_rope=chained(gemv16_rope_linear),
        fp8_weight_only_rope_linear=chained(fp8_weight_only_rope_linear),
        gather_columns=chained(gather_columns),
        fp8_block_linear=fp8_block_linear,
        fp8_block_weight_only_linear=chained(fp8_block_weight_only_linear),
        fp8_block_weight_only_gated_linear=chained(fp8_block_weight_only_gated_linear),
        linear16_gated=chained(gemv16_gated_linear),
        linear16=chained(gemv16_linear),
        lora_shrink=lora_shrink,
        lora_expand=lora_expand,
        fused_moe=fused_moe,
    )
