"""Paged attention over the KV cache, and the metadata the runner builds for it each step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import torch
from torch import nn

from gpu_worker.model_executor.weights import TensorSource
from kernels import KernelOps
from kernels.quant_reference import FP8_MIN_AMAX

T = TypeVar("T")

# fp8 KV scales computed from data (``EngineConfig.calculate_kv_scales``): ``amax(|x|) / divisor``,
# vLLM's K_SCALE_CONSTANT / V_SCALE_CONSTANT (200, 100) rather than e4m3's 448: the one prefill
# they come from rarely holds the largest K/V the engine will see, and larger values saturate
# at +-448 * scale, so the calibration maximum lands at 200 (K) / 100 (V) and values up to 2.2x /
# 4.5x it still fit. e4m3 keeps 3 mantissa bits down to 2^-6, so the headroom costs small values
# nothing until they are 2^-6 * scale (relative to amax: 2^-6 / 200 = 7.8e-5).
KV_SCALE_DIVISORS = MappingProxyType({"k_scale": 200.0, "v_scale": 100.0})
# Floor of the amax (kernels.quant_reference's, shared with the fp8 linears): a layer whose
# calibration K or V is all zeros gets a tiny finite scale, never 0 (whose reciprocal is inf).
KV_SCALE_MIN_AMAX = FP8_MIN_AMAX


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens go in the KV cache and what each query attends to.

    Shared by every layer of one forward. ``S`` sequences with ``T`` new tokens in total,
    packed back to back in the order of the scheduler's requests.
    """

    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token (negative: do not store)
    block_tables: torch.Tensor  # [S, max_blocks] int32
    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32, context length including this step's tokens
    max_query_len: int
    max_seq_len: int
    # Leading sequences with one query token each (a mixed step's decodes, which the scheduler
    # plans first): attention may send them to its decode kernel. A hint: 0 is always valid.
    num_decodes: int = 0
    # Per-step work derived from the fields above (and the step's positions), built by the
    # first layer that asks (:meth:`plan`) and shared by the others. Only op sets with plans
    # (the CPU references) fill it; it never holds inputs, so the dataclass stays a value.
    plans: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)
    # Set only while the runner captures a mixed step's piecewise CUDA graphs: each attention
    # call then ends a captured piece instead of attending (gpu_worker.worker.mixed_graphs).
    piecewise: Any = field(default=None, compare=False, repr=False)

    def plan(self, key: str, build: Callable[[], T]) -> T:
        """The step's plan named ``key``: ``build()`` on the first call, the same object after."""
        found = self.plans.get(key)
        if found is None:
            found = self.plans[key] = build()
        return found  # type: ignore[no-any-return]

    @property
    def decode_only(self) -> bool:
        """Every sequence has exactly one new token (so ``T == S``)."""
        return self.max_query_len == 1


def param_of(module: nn.Module, name: str) -> torch.Tensor:
    """A module's tensor attribute (parameter or buffer), typed."""
    value: torch.Tensor = getattr(module, name)
    return value


class PagedAttention(nn.Module):
    """Stores the new K/V in the cache, then attends over each sequence's paged context.

    :meth:`forward` does both; :meth:`attend` only attends, for callers that already stored
    this step's K/V (an op set's fused ``rotary_store_kvcache``).

    An fp8 (e4m3) cache stores ``K / k_scale`` and ``V / v_scale``: float32 buffers ``[1]`` (per
    tensor) or ``[num_kv_heads]`` (this rank's KV heads, from ``kv_head_start`` of
    ``total_kv_heads``), from the checkpoint when it has them (:meth:`load`), else 1.0 until
    computed from the first real forward (:attr:`calibrate`, :meth:`calibrate_kv_scales`); every
    KV op gets them (:meth:`kv_scales`). A 16/32-bit cache ignores them. :attr:`scale_sources`
    says where each came from: ``default`` (1.0), ``checkpoint`` or ``computed``.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        ops: KernelOps,
        *,
        kv_head_start: int = 0,
        total_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.ops = ops
        self.kv_head_start = kv_head_start
        self.total_kv_heads = total_kv_heads or num_kv_heads
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32))
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32))
        self.scale_sources = {"k_scale": "default", "v_scale": "default"}
        # Set by the runner for the first real forward only: that forward computes, from the K/V
        # it stores, the scales the checkpoint did not set, then clears it.
        self.calibrate = False
        # Op sets with plans (the CPU references) do the step's index work once, in the first
        # layer, and store + attend in one call; the others store, then attend.
        self.plan_op = ops.plan_paged_attention
        self.planned_op = ops.paged_attention_with_plan

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
    ) -> torch.Tensor:
        """q ``[T, Hq, D]``, k/v ``[T, Hk, D]``, kv_cache ``[2, blocks, block, Hk, D]`` -> ``[T, Hq, D]``."""
        if md.piecewise is not None:  # capturing: a piece ends here (gpu_worker.worker.mixed_graphs)
            out: torch.Tensor = md.piecewise.split(self, q, k, v, kv_cache)
            return out
        if self.calibrate:
            self.calibrate_kv_scales(k, v, md.slot_mapping)
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        scales = self.kv_scales(kv_cache)
        if self.plan_op is not None and self.planned_op is not None:
            plan = md.plan("paged_attention", lambda: self._plan(md, key_cache.shape[1]))
            out = self.planned_op(q, k, v, key_cache, value_cache, plan, self.scale, **scales)
            return out
        self.ops.store_kvcache(k, v, key_cache, value_cache, md.slot_mapping, **scales)
        return self.attend(q, kv_cache, md)

    def kv_scales(self, kv_cache: torch.Tensor) -> dict[str, torch.Tensor]:
        """The keyword arguments every KV op takes for ``kv_cache``: the scales of an fp8 cache."""
        if kv_cache.dtype != torch.float8_e4m3fn:
            return {}
        return {"k_scale": param_of(self, "k_scale"), "v_scale": param_of(self, "v_scale")}

    def reset_kv_scales(self) -> None:
        """Scales 1.0 (after the model is materialized, before a checkpoint may set them)."""
        for name in ("k_scale", "v_scale"):
            setattr(self, name, torch.ones(1, dtype=torch.float32, device=param_of(self, name).device))
            self.scale_sources[name] = "default"

    def calibrate_kv_scales(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Per-tensor scales ``max(amax(|x|), KV_SCALE_MIN_AMAX) / KV_SCALE_DIVISORS[name]`` of this
        step's ``k``/``v`` ``[T, Hk, D]`` (tokens with a slot: padding excluded), for each scale the
        checkpoint did not set; clears :attr:`calibrate`. On the device, no host sync.

        Invariant: called once, from the engine's first real forward, before that forward stores
        any K/V; the scales are frozen from then on. Every fp8 entry in the cache was written
        with the scale it is read with: nothing was written before (the profile and warm-up
        steps' junk slots are never read), and no scale changes after. So prefix-cache hits,
        preempted-and-resumed requests and later decode steps read valid K/V. The buffers are
        updated in place: decode CUDA graphs captured during warm-up read them by address.
        """
        valid = (slot_mapping >= 0)[:, None, None]
        for name, x in (("k_scale", k), ("v_scale", v)):
            if self.scale_sources[name] == "checkpoint":
                continue  # a checkpoint's scales are never overwritten
            amax = torch.where(valid, x.abs(), 0).amax().float().clamp_min(KV_SCALE_MIN_AMAX)
            param_of(self, name).copy_(torch.div(amax, torch.full_like(amax, KV_SCALE_DIVISORS[name])))
            self.scale_sources[name] = "computed"
        self.calibrate = False

    def load(self, name: str, source: TensorSource, shard: int = 0) -> None:
        """A checkpoint's ``k_scale``/``v_scale`` (vLLM's names): one value, or one per KV head
        (this rank keeps its heads')."""
        if name not in ("k_scale", "v_scale"):
            raise ValueError(f"attention loads k_scale and v_scale, not {name!r}")
        value = source.full().to(torch.float32).reshape(-1)
        if value.numel() == self.total_kv_heads and value.numel() > 1:
            value = value[self.kv_head_start : self.kv_head_start + self.num_kv_heads]
        elif value.numel() != 1:
            raise ValueError(f"{name} of {value.numel()} values for {self.total_kv_heads} KV heads")
        setattr(self, name, value.contiguous().to(param_of(self, name).device))
        self.scale_sources[name] = "checkpoint"

    def attend(
        self, q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention only: q ``[T, Hq, D]`` -> ``[T, Hq, D]`` (written into ``out`` when given);
        this step's K/V must already be in ``kv_cache`` (at ``md.slot_mapping``). Not for op sets
        with plans, whose planned attention stores K/V itself (:class:`kernels.KernelOps` never
        pairs them with a fused store).
        """
        if self.plan_op is not None and self.planned_op is not None:
            raise RuntimeError(f"op set {self.ops.name!r} stores K/V inside attention; call forward")
        if md.piecewise is not None:  # capturing: a piece ends here (gpu_worker.worker.mixed_graphs)
            piece_out: torch.Tensor = md.piecewise.split(self, q, None, None, kv_cache)
            return piece_out
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        kwargs = self.kv_scales(kv_cache)
        if out is not None:
            kwargs["out"] = out
        if md.decode_only:
            return self.ops.paged_decode_attention(
                q, key_cache, value_cache, md.block_tables, md.seq_lens, self.scale, md.max_seq_len, **kwargs
            )
        return self.ops.paged_attention(
            q,
            key_cache,
            value_cache,
            md.block_tables,
            md.query_start_loc,
            md.seq_lens,
            self.scale,
            md.max_query_len,
            md.max_seq_len,
            num_decodes=md.num_decodes,
            **kwargs,
        )

    def _plan(self, md: AttentionMetadata, block_size: int) -> Any:
        assert self.plan_op is not None  # invariant: only called when the ops plan
        return self.plan_op(
            md.slot_mapping,
            md.block_tables,
            md.query_start_loc,
            md.seq_lens,
            block_size,
            md.max_query_len,
            md.max_seq_len,
        )
