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
    # fp8 weights on the unquantized activation (W8A16, quant_reference.fp8_weight_only_linear)
    # for steps of at most fp8_weight_only_max_m tokens (0: never): there the norms and SiLU
    # before an fp8 linear skip their quantization and the linear reads the 16-bit activation.
    fp8_weight_only_linear: Callable[..., Any] | None = None
    fp8_weight_only_max_m: int = 0
    # Optional one-token [gate; up] products with SiLU-and-mul in the GEMV's epilogue:
    # silu_and_mul(fp8_weight_only_linear(...)) and silu_and_mul(wna16_linear(...)) for x of one
    # token, bit-for-bit the two ops (None: the MLP runs the linear, then silu_and_mul).
    fp8_weight_only_gated_linear: Callable[..., Any] | None = None
    wna16_gated_linear: Callable[..., Any] | None = None
    # Block-wise fp8 weights (``w_scale`` ``[ceil(N / bn), ceil(K / bk)]``, ``block`` ``(bn, bk)``;
    # quant_reference.fp8_block_linear and fp8_block_weight_only_linear): W8A8 with activations
    # quantized per token in groups of bk, and W8A16 for steps of at most fp8_weight_only_max_m
    # tokens; the gated one-token form as above (None: the linear, then silu_and_mul).
    fp8_block_linear: Callable[..., Any] | None = None
    fp8_block_weight_only_linear: Callable[..., Any] | None = None
    fp8_block_weight_only_gated_linear: Callable[..., Any] | None = None
    # Optional x.index_select(-1, index) (an act-order layer's input reorder) that launches in the
    # decode chain (None: torch's index_select).
    gather_columns: Callable[..., Any] | None = None
    # Optional one-token [q; k; v] 4-bit linear with rotary + K/V store in its epilogue:
    # (x, qweight, scales, offsets, bits, group_size, bias, rope: kernels.rope_store.RopeStore) ->
    # the rotated q, bit for bit wna16_linear then rotary_store_kvcache, or None where the fused
    # kernel does not apply (None: the layer runs the linear, then rotary_store_kvcache).
    wna16_rope_linear: Callable[..., Any] | None = None
    # The same for 16/32-bit weights, (x, w, bias, rope), and fp8 weight-only ones with
    # per-channel scales, (x, w_fp8, w_scale, bias, rope) (16-bit: not the plain one-token
    # GEMV's bits, its tiling pairs rows).
    linear16_rope: Callable[..., Any] | None = None
    fp8_weight_only_rope_linear: Callable[..., Any] | None = None
    # Optional (n, k, device) -> the arrival counts a one-token wna16_linear of an [n, k] weight
    # takes as ``counters=`` (its split-K sums added in the GEMV instead of a second launch), or
    # None where it needs none (None: the set's wna16_linear takes no counters).
    wna16_split_counters: Callable[..., Any] | None = None
    # The same for 16/32-bit weights: silu_and_mul(x @ w.T + bias) for x of one token (not the
    # same bits as cuBLAS + silu_and_mul: its own order of sums).
    linear16_gated: Callable[..., Any] | None = None
    # The one-token 16/32-bit linear: x @ w.T + bias for x of one token (None: torch's linear,
    # cuBLAS on CUDA; not the same bits: its own order of sums).
    linear16: Callable[..., Any] | None = None
    # Multi-LoRA, one adapter slot per token (reference.lora_shrink / lora_expand have the
    # contracts; slot 0 is "no adapter"): lora_shrink(x, a, slots) -> float32 [T, R], and
    # lora_expand(y, xa, b, slots, scales), in place on y. Without them (None) a set serves no
    # adapters; every set of this package has them.
    lora_shrink: Callable[..., Any] | None = None
    lora_expand: Callable[..., Any] | None = None
    # Mixture of experts (reference.fused_moe has the contract): fused_moe(x, w13, w2,
    # topk_weights, topk_ids) -> [T, H]. Without it (None) a set serves no MoE model; every set of
    # this package has it.
    fused_moe: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.fp8_weight_only_max_m <= FP8_WEIGHT_ONLY_MAX_M_LIMIT:
            raise ValueError(
                f"fp8_weight_only_max_m must be in [0, {FP8_WEIGHT_ONLY_MAX_M_LIMIT}], "
                f"got {self.fp8_weight_only_max_m}"
            )
        if self.rotary_store_kvcache is not None and self.paged_attention_with_plan is not None:
            raise ValueError(
                f"op set {self.name!r}: rotary_store_kvcache and paged_attention_with_plan both "
                "store K/V; give one of them"
            )


    def fp8_weight_only(self, tokens: int) -> bool:
        """Whether an fp8 linear over ``tokens`` tokens reads the unquantized activation (W8A16):
        the norm or activation before it then hands it over unquantized."""
        return self.fp8_weight_only_linear is not None and tokens <= self.fp8_weight_only_max_m


# fp8 steps of up to this many tokens run weight-only by default (one-token decode: the GEMV
# reads the 16-bit activation, no quantization launch; docs/QUANTIZATION.md, DECISIONS 95).
FP8_WEIGHT_ONLY_MAX_M = 1
# The most tokens the weight-only GEMV takes (kernels.triton_ops.gemv.MAX_M).
FP8_WEIGHT_ONLY_MAX_M_LIMIT = 16


def resolve_fp8_weight_only_max_m(value: int | None) -> int:
    """An engine's ``fp8_weight_only_max_tokens`` as the op sets take it (None: the default)."""
    return FP8_WEIGHT_ONLY_MAX_M if value is None else value


def reference_ops(fp8_weight_only_max_m: int = FP8_WEIGHT_ONLY_MAX_M) -> KernelOps:
    """The plain torch implementations (CPU path, and the ground truth in tests). The fp8
    dispatch threshold is the CUDA set's, so the CPU emulates what the GPU computes."""
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
        fp8_weight_only_linear=quant_reference.fp8_weight_only_linear,
        fp8_weight_only_max_m=fp8_weight_only_max_m,
        fp8_block_linear=quant_reference.fp8_block_linear,
        fp8_block_weight_only_linear=quant_reference.fp8_block_weight_only_linear,
        lora_shrink=reference.lora_shrink,
        lora_expand=reference.lora_expand,
        fused_moe=reference.fused_moe,
    )


def greedy_argmax(device: Any, vocab: int, max_rows: int) -> Callable[[Any], Any] | None:
    """The argmax greedy sampling takes over ``[N, vocab]`` logits on ``device``: on CUDA the
    Triton kernel of :mod:`kernels.triton_ops.sampling` for up to ``max_rows`` rows; None
    (torch's ``argmax``) elsewhere."""
    if not str(device).startswith("cuda"):
        return None
    try:
        from kernels.triton_ops.sampling import GreedyArgmax
    except ImportError:
        return None
    return GreedyArgmax(vocab, device, max_rows)


def get_ops(device: Any, *, fp8_weight_only_max_m: int | None = None, pdl: bool = True) -> KernelOps:
    """The ops to use on ``device`` (a ``torch.device`` or string). ``fp8_weight_only_max_m``:
    tokens up to which fp8 linears run weight-only (None: :data:`FP8_WEIGHT_ONLY_MAX_M`).
    ``pdl``: on devices that have it (sm_90+), the decode ops launch with programmatic dependent
    launch (:func:`kernels.triton_ops.triton_ops`)."""
    max_m = resolve_fp8_weight_only_max_m(fp8_weight_only_max_m)
    if str(device).startswith("cuda"):
        try:
            from kernels.triton_ops import triton_ops
            from kernels.triton_ops.pdl import pdl_supported
        except ImportError:
            return reference_ops(max_m)
        return triton_ops(max_m, pdl=pdl and pdl_supported(device))
    return reference_ops(max_m)
