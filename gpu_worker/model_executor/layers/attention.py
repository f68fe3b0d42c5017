"""Paged attention over the KV cache, and the metadata the runner builds for it each step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

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


class PagedAttention(nn.Module):
    """Stores the new K/V in the cache, then attends over each sequence's paged context.

    :meth:`forward` does both; :meth:`attend` only attends, for callers that already stored
    this step's K/V (an op set's fused ``rotary_store_kvcache``).
    """

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, ops: KernelOps
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.ops = ops
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
        if self.plan_op is not None and self.planned_op is not None:
            plan = md.plan("paged_attention", lambda: self._plan(md, key_cache.shape[1]))
            out: torch.Tensor = self.planned_op(q, k, v, key_cache, value_cache, plan, self.scale)
            return out
        self.ops.store_kvcache(k, v, key_cache, value_cache, md.slot_mapping)
        return self.attend(q, kv_cache, md)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """Attention only: q ``[T, Hq, D]`` -> ``[T, Hq, D]``; this step's K/V must already be in
        ``kv_cache`` (at ``md.slot_mapping``). Not for op sets with plans, whose planned
        attention stores K/V itself (:class:`kernels.KernelOps` never pairs them with a fused store).
        """
        if self.plan_op is not None and self.planned_op is not None:
            raise RuntimeError(f"op set {self.ops.name!r} stores K/V inside attention; call forward")
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        if md.decode_only:
            return self.ops.paged_decode_attention(
                q, key_cache, value_cache, md.block_tables, md.seq_lens, self.scale, md.max_seq_len
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
