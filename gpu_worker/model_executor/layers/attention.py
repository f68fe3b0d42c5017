"""Paged attention over the KV cache, and the metadata the runner builds for it each step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from gpu_worker.model_executor.weights import TensorSource
from kernels import KernelOps

T = TypeVar("T")


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
    # Per-step work derived from the fields above (and the step's positions), built by the
    # first layer that asks (:meth:`plan`) and shared by the others. Only op sets with plans
    # (the CPU references) fill it; it never holds inputs, so the dataclass stays a value.
    plans: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

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
    ``total_kv_heads``), 1.0 unless the checkpoint has them (:meth:`load`); every KV op gets them
    (:meth:`kv_scales`). A 16/32-bit cache ignores them.
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
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        scales = self.kv_scales(kv_cache)
        if self.plan_op is not None and self.planned_op is not None:
            plan = md.plan("paged_attention", lambda: self._plan(md, key_cache.shape[1]))
            out: torch.Tensor = self.planned_op(q, k, v, key_cache, value_cache, plan, self.scale, **scales)
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

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """Attention only: q ``[T, Hq, D]`` -> ``[T, Hq, D]``; this step's K/V must already be in
        ``kv_cache`` (at ``md.slot_mapping``). Not for op sets with plans, whose planned
        attention stores K/V itself (:class:`kernels.KernelOps` never pairs them with a fused store).
        """
        if self.plan_op is not None and self.planned_op is not None:
            raise RuntimeError(f"op set {self.ops.name!r} stores K/V inside attention; call forward")
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        scales = self.kv_scales(kv_cache)
        if md.decode_only:
            return self.ops.paged_decode_attention(
                q, key_cache, value_cache, md.block_tables, md.seq_lens, self.scale, md.max_seq_len, **scales
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
            **scales,
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
