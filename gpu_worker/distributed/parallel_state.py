"""This rank's place in the tensor- and pipeline-parallel layout, and the collectives layers use.

Rank layout (as vLLM's): ``rank = pp_rank * tp_size + tp_rank``. Tensor-parallel groups are the
``tp_size`` consecutive ranks of one pipeline stage; the first stage's TP rank 0 (global rank 0)
is the driver, the last stage's TP rank 0 samples. With one rank every collective is the
identity and no process group exists, so a single-GPU model is exactly the plain model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ParallelConfig:
    """How one engine spreads its model: ``tensor_parallel_size`` ranks per pipeline stage."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size must be >= 1")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def rank_of(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tensor_parallel_size + tp_rank


def layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """The contiguous layers ``[start, end)`` of stage ``pp_rank``: as even as possible, the
    first ``num_layers % pp_size`` stages one layer longer."""
    if pp_size > num_layers:
        raise ValueError(f"pipeline_parallel_size {pp_size} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


class TensorParallelGroup:
    """The tensor-parallel group of this rank: its rank and size, and the collectives the
    parallel layers call. ``group`` is None for a single rank (every collective is the identity).
    ``ranks`` are the group's global ranks, TP rank order."""

    def __init__(self, rank: int = 0, size: int = 1, group: Any = None, ranks: tuple[int, ...] = (0,)):
        if not 0 <= rank < size or (size > 1 and group is None):
            raise ValueError(f"bad tensor-parallel group: rank {rank} of {size}")
        self.rank, self.size, self.group, self.ranks = rank, size, group, ranks

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place (the identity for one rank)."""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum of ``x`` over the group, in place (quantization scales of
        row-parallel weights: a row's maximum over every rank's columns)."""
        if self.size > 1:
            torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return x

    def gather_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x`` of every rank concatenated along the last dim on TP rank 0 (None elsewhere)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        torch.distributed.gather(x, parts, dst=self.ranks[0], group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """TP rank 0's ``x`` on every rank, in place."""
        if self.size > 1:
            torch.distributed.broadcast(x, src=self.ranks[0], group=self.group)
        return x


@dataclass(frozen=True)
class IntermediateTensors:
    """What one pipeline stage hands the next: the hidden states and the residual stream."""

    hidden: torch.Tensor
    residual: torch.Tensor


@dataclass(frozen=True)
class ModelParallel:
    """What a model needs to build and run its shard: the TP group and its pipeline stage."""

    tp: TensorParallelGroup = field(default_factory=TensorParallelGroup)
    pp_rank: int = 0
    pp_size: int = 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def samples(self) -> bool:
        """This rank samples: TP rank 0 of the last stage (it holds the gathered logits)."""
        return self.is_last_stage and self.tp.rank == 0

    def layers(self, num_layers: int) -> tuple[int, int]:
        return layer_range(num_layers, self.pp_rank, self.pp_size)

    def _stage_rank(self, pp_rank: int) -> int:
        return pp_rank * self.tp.size + self.tp.rank

    def send_to_next_stage(self, tensors: IntermediateTensors) -> None:
        """Hand this stage's activations to the same TP rank of the next stage."""
        dst = self._stage_rank(self.pp_rank + 1)
        torch.distributed.send(tensors.hidden.contiguous(), dst=dst)
        torch.distributed.send(tensors.residual.contiguous(), dst=dst)

    def recv_from_prev_stage(
        self, num_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device
    ) -> IntermediateTensors:
        """The previous stage's activations for a step of ``num_tokens`` tokens."""
        src = self._stage_rank(self.pp_rank - 1)
        hidden = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)
        residual = torch.empty_like(hidden)
        torch.distributed.recv(hidden, src=src)
        torch.distributed.recv(residual, src=src)
        return IntermediateTensors(hidden, residual)
