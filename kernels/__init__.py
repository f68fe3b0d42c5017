"""llmserve's compute kernels: Triton kernels and their torch references.

Every op has a torch reference in :mod:`kernels.reference` (the quantized linears in
:mod:`kernels.quant_reference`) and, where it pays, a Triton kernel with the same signature.
:func:`get_ops` picks the set for a device once; models receive the result and never branch
on the device themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kernels import quant_reference, reference


@dataclass(frozen=True)
class KernelOps:
    """One implementation of each op (see :mod:`kernels.reference` for the contracts)."""

    name: str
    rms_norm: Callable[..., Any]
    fused_add_rms_norm: Callable[..., Any]
    silu_and_mul: Callable[..., Any]
    rotary_embedding: Callable[..., Any]
    store_kvcache: Callable[..., Any]
    paged_attention: Callable[..., Any]
    paged_decode_attention: Callable[..., Any]
    # Quantized linears (kernels.quant_reference has the contracts): fp8 W8A8 and WnA16.
    quantize_fp8_per_token: Callable[..., Any]
    fp8_linear: Callable[..., Any]
    wna16_linear: Callable[..., Any]
    # Optional per-step plans (None: the set has none, layers call the ops above). A plan
    # holds the work that depends only on the step's metadata (context gather indices, query
    # layout, mask; rotary cos/sin rows): the first layer of a step builds it, every layer
    # reuses it. The planned attention also stores the new K/V (it replaces store_kvcache).
    plan_paged_attention: Callable[..., Any] | None = None
    paged_attention_with_plan: Callable[..., Any] | None = None
    plan_rotary_embedding: Callable[..., Any] | None = None
    rotary_embedding_with_plan: Callable[..., Any] | None = None
    # Optional fused rotary_embedding + store_kvcache (None: layers call the two ops). With it
    # a layer rotates and stores in one call, then only attends. Sets whose planned attention
    # stores K/V itself must not have it: the K/V would be stored twice.
    rotary_store_kvcache: Callable[..., Any] | None = None
    # Optional norm / activation fused with the per-token fp8 quantization of their output
    # (an Fp8Activation for the fp8 linear that follows; None: layers quantize in the linear).
    rms_norm_fp8: Callable[..., Any] | None = None
    fused_add_rms_norm_fp8: Callable[..., Any] | None = None
    silu_and_mul_fp8: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.rotary_store_kvcache is not None and self.paged_attention_with_plan is not None:
            raise ValueError(
                f"op set {self.name!r}: rotary_store_kvcache and paged_attention_with_plan both "
                "store K/V; give one of them"
            )


def reference_ops() -> KernelOps:
    """The plain torch implementations (CPU path, and the ground truth in tests)."""
    return KernelOps(
        name="reference",
        rms_norm=reference.rms_norm,
        fused_add_rms_norm=reference.fused_add_rms_norm,
        silu_and_mul=reference.silu_and_mul,
        rotary_embedding=reference.rotary_embedding,
        store_kvcache=reference.store_kvcache,
        paged_attention=reference.paged_attention,
        paged_decode_attention=reference.paged_decode_attention,
        quantize_fp8_per_token=quant_reference.quantize_fp8_per_token,
        fp8_linear=quant_reference.fp8_linear,
        wna16_linear=quant_reference.wna16_linear,
        plan_paged_attention=reference.plan_paged_attention,
        paged_attention_with_plan=reference.paged_attention_with_plan,
        plan_rotary_embedding=reference.plan_rotary_embedding,
        rotary_embedding_with_plan=reference.rotary_embedding_with_plan,
        rms_norm_fp8=reference.rms_norm_fp8,
        fused_add_rms_norm_fp8=reference.fused_add_rms_norm_fp8,
        silu_and_mul_fp8=reference.silu_and_mul_fp8,
    )


def get_ops(device: Any) -> KernelOps:
    """The ops to use on ``device`` (a ``torch.device`` or string)."""
    if str(device).startswith("cuda"):
        try:
            from kernels.triton_ops import triton_ops
        except ImportError:
            return reference_ops()
        return triton_ops()
    return reference_ops()
