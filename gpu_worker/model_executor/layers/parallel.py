"""Tensor-parallel layers: each rank holds a shard and one collective joins the shards.

- :class:`ColumnParallelLinear` splits the output features (QKV and gate/up: merged per rank,
  :class:`QKVParallelLinear`, :class:`MergedColumnParallelLinear`);
- :class:`RowParallelLinear` splits the input features and sums the partial products with one
  all-reduce (O and down projections); its bias is added once, after the sum;
- :class:`VocabParallelEmbedding` and :class:`ParallelLMHead` split the vocabulary: lookups are
  masked to the rank's range and summed; logits are gathered on the sampling rank.

With one rank each layer is the plain one and computes exactly what ``nn.Linear`` /
``nn.Embedding`` compute. Every layer loads its shard itself (:meth:`load`), from a
:class:`~gpu_worker.model_executor.weights.TensorSource` that reads only the slice asked for,
so a rank never holds more than its part of the checkpoint. The product itself is the layer's
:class:`~gpu_worker.model_executor.layers.quantization.base.LinearMethod`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from gpu_worker.distributed.parallel_state import TensorParallelGroup
from gpu_worker.model_executor.layers.quantization.base import (
    LinearMethod,
    UnquantizedLinearMethod,
    WeightShard,
)
from gpu_worker.model_executor.weights import TensorSource
from kernels.rope_store import RopeStore


def divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({parts})")
    return total // parts


def _copy_rows(target: torch.Tensor, dst: int, source: TensorSource, dim: int, src: int, length: int) -> None:
    with torch.no_grad():
        target.narrow(0, dst, length).copy_(source.narrow(dim, src, length))


class _Linear(nn.Module):
    """Weight ``[out_local, in_local]`` through ``method``, optional bias ``[bias_size]``.

    ``lora``: the LoRA adapters of the layer (``gpu_worker.lora.layers.LoraLinear``, set by
    ``attach_lora``; None without): their term joins the layer's product (before a row-parallel
    layer's all-reduce), and the fused one-token paths (gated, rotary) step aside for it."""

    lora: Any = None

    def __init__(
        self, in_local: int, out_local: int, bias_size: int | None, dtype: torch.dtype, method: LinearMethod
    ) -> None:
        super().__init__()
        self.in_features_local = in_local
        self.out_features_local = out_local
        self.linear_method = method
        method.create_weights(self, in_local, out_local, dtype)
        self.bias = None
        if bias_size:
            self.bias = nn.Parameter(torch.empty(bias_size, dtype=dtype), requires_grad=False)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.linear_method.apply(self, x, bias)


class ColumnParallelLinear(_Linear):
    """``y = x W^T + b`` with W's output rows (and b) split across the TP ranks: each rank
    computes its slice of ``y``. ``output_sizes`` lists the sub-matrices fused in W (gate and
    up, say): each is split on its own, so rank r holds rows ``r/tp`` of every one of them."""

    def __init__(
        self,
        in_features: int,
        output_sizes: Sequence[int],
        *,
        bias: bool,
        dtype: torch.dtype,
        tp: TensorParallelGroup,
        method: LinearMethod,
    ) -> None:
        self.tp = tp
        self.local_sizes = [divide(n, tp.size, "output features") for n in output_sizes]
        out_local = sum(self.local_sizes)
        super().__init__(in_features, out_local, out_local if bias else None, dtype, method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, self.bias)
        return y if self.lora is None else self.lora.apply(x, y)

    def shard_rows(self, shard: int) -> tuple[int, int, int]:
        """(first local row, first checkpoint row, rows) of fused sub-matrix ``shard``."""
        size = self.local_sizes[shard]
        return sum(self.local_sizes[:shard]), self.tp.rank * size, size

    def load(self, name: str, source: TensorSource, shard: int = 0) -> Iterable[str]:
        """Copy this rank's rows of checkpoint tensor ``source`` (sub-matrix ``shard``): the bias
        here, the weight (and whatever a quantized checkpoint stores with it) through the
        layer's linear method. Returns the names of the parameters filled."""
        dst, src, rows = self.shard_rows(shard)
        if name == "bias":
            _copy_rows(getattr(self, name), dst, source, 0, src, rows)
            return (name,)
        return self.linear_method.load_weight(self, name, source, WeightShard(0, src, rows, dst, shard))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matrix (gate and up)."""

    def gated(self, x: torch.Tensor) -> torch.Tensor | None:
        """``silu(gate) * up`` of this ``[gate; up]`` layer's product with ``x``, when ``x`` is one
        token and the linear method fuses the activation (``LinearMethod.apply_gated``); else
        None. Each rank holds its own shard of both halves, so the pairs are rank-local."""
        halves = len(self.local_sizes) == 2 and self.local_sizes[0] == self.local_sizes[1]
        if not halves or x.numel() != x.shape[-1] or self.lora is not None:
            return None
        return self.linear_method.apply_gated(self, x, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V in one matrix, split by heads: each rank holds ``num_heads / tp`` query heads
    and ``num_kv_heads / tp`` KV heads; when there are fewer KV heads than ranks, each KV head is
    replicated on ``tp / num_kv_heads`` consecutive ranks (rank r holds head ``r // replicas``)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        bias: bool,
        dtype: torch.dtype,
        tp: TensorParallelGroup,
        method: LinearMethod,
    ) -> None:
        self.num_heads = divide(num_heads, tp.size, "num_attention_heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = divide(num_kv_heads, tp.size, "num_key_value_heads")
            self.kv_head_start = tp.rank * self.num_kv_heads
        else:
            replicas = divide(tp.size, num_kv_heads, "tensor_parallel_size over num_key_value_heads")
            self.num_kv_heads, self.kv_head_start = 1, tp.rank // replicas
        self.head_dim = head_dim
        q, kv = num_heads * head_dim, self.num_kv_heads * tp.size * head_dim
        super().__init__(hidden_size, [q, kv, kv], bias=bias, dtype=dtype, tp=tp, method=method)

    def rotate_and_store(self, x: torch.Tensor, rope: RopeStore) -> torch.Tensor | None:
        """The rotated q ``[1, Hq * D]`` of this rank's heads, its rotated k and v stored into
        ``rope``'s cache, when ``x`` is one token and the linear method fuses rotary and the K/V
        store into its one-token GEMV (``LinearMethod.apply_rope``); else None (nothing stored)."""
        if not isinstance(x, torch.Tensor) or x.numel() != x.shape[-1] or self.lora is not None:
            return None  # several tokens, an fp8 activation the norm quantized (W8A8), or LoRA
        return self.linear_method.apply_rope(self, x, self.bias, rope)

    def shard_rows(self, shard: int) -> tuple[int, int, int]:
        if shard == 0:
            return super().shard_rows(0)
        rows = self.num_kv_heads * self.head_dim
        dst = self.local_sizes[0] + (shard - 1) * rows
        return dst, self.kv_head_start * self.head_dim, rows


class RowParallelLinear(_Linear):
    """``y = x W^T + b`` with W's input columns split: rank r multiplies its slice of ``x`` (the
    output of a column-parallel layer) and one all-reduce sums the partial products."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        dtype: torch.dtype,
        tp: TensorParallelGroup,
        method: LinearMethod,
    ) -> None:
        self.tp = tp
        self.in_local = divide(in_features, tp.size, "input features")
        super().__init__(self.in_local, out_features, out_features if bias else None, dtype, method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            y = self.matmul(x, self.bias)
            return y if self.lora is None else self.lora.apply(x, y)
        partial = self.matmul(x, None)
        if self.lora is not None:  # this rank's share of the adapter term: summed with the product
            partial = self.lora.apply(x, partial)
        y = self.tp.all_reduce(partial)
        return y if self.bias is None else y + self.bias

    def load(self, name: str, source: TensorSource, shard: int = 0) -> Iterable[str]:
        if name == "bias":  # replicated: added once, after the all-reduce
            target = getattr(self, name)
            _copy_rows(target, 0, source, 0, 0, target.shape[0])
            return (name,)
        shard_cols = WeightShard(1, self.tp.rank * self.in_local, self.in_local)
        return self.linear_method.load_weight(self, name, source, shard_cols)


class VocabParallelEmbedding(nn.Module):
    """Token embeddings with the vocabulary split in ``tp`` equal ranges (the last padded):
    each rank looks up the ids in its range, zeros the others, and an all-reduce sums them."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype, tp: TensorParallelGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp.size)
        self.start = tp.rank * self.rows
        self.end = min(self.start + self.rows, vocab_size)
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(ids, self.weight)
        inside = (ids >= self.start) & (ids < self.end)
        out = nn.functional.embedding(torch.where(inside, ids - self.start, 0), self.weight)
        out.masked_fill_(~inside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)

    def load(self, name: str, source: TensorSource, shard: int = 0) -> Iterable[str]:
        rows = self.end - self.start
        with torch.no_grad():
            self.weight[rows:].zero_()  # padding rows of the last rank: never looked up
        _copy_rows(self.weight, 0, source, 0, self.start, rows)
        return ("weight",)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection over the vocabulary, split like the embedding: each rank computes
    the logits of its range; they are gathered, unpadded, on the sampling rank.

    ``tied``: the embedding whose weight this head reads (same shard, no copy on the GPU). It
    is looked up at call time rather than shared as one parameter: moving a model off the meta
    device gives every module its own tensors, which would silently untie them.

    An untied head with a quantized ``method`` (a GPTQ checkpoint's ``lm_head: true``, a GGUF's
    ``output.weight``) holds its rows ``[start, end)`` in that method's layout instead of
    ``weight``, loaded like a column-parallel layer's; the last rank's logits are padded to
    ``rows`` columns so that every rank's are alike for the gather."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        dtype: torch.dtype,
        tp: TensorParallelGroup,
        method: LinearMethod,
        tied: VocabParallelEmbedding | None = None,
    ) -> None:
        super().__init__(vocab_size, hidden_size, dtype=dtype, tp=tp)
        self.linear_method = method
        self._tied = (tied,) if tied is not None else ()  # a tuple: not registered as a submodule
        self.quantized = tied is None and not isinstance(method, UnquantizedLinearMethod)
        if tied is not None or self.quantized:
            del self.weight
        if self.quantized:
            method.create_weights(self, hidden_size, self.end - self.start, dtype)

    def __getattr__(self, name: str) -> Any:
        if name == "weight" and self._tied:
            return self._tied[0].weight
        return super().__getattr__(name)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits ``[N, vocab]`` in the model's dtype on the sampling TP rank (None on the
        others). Not upcast here: a plain greedy step takes the argmax of the 16-bit logits
        (:meth:`gpu_worker.worker.sampler.Sampler.sample`), and whatever needs float32 (sampling,
        penalties, logprobs, draft verification) converts them itself."""
        logits = self.linear_method.apply(self, hidden, None)
        if self.tp.size > 1:
            if logits.shape[-1] < self.rows:  # a quantized head's last rank: no padding rows
                logits = nn.functional.pad(logits, (0, self.rows - logits.shape[-1]))
            gathered = self.tp.gather_to_first(logits)
            if gathered is None:
                return None
            logits = gathered[..., : self.vocab_size]
        return logits

    def load(self, name: str, source: TensorSource, shard: int = 0) -> Iterable[str]:
        """A 16-bit head's rows as the embedding loads them; a quantized head's through its
        method (``weight``, or ``qweight``/``scales``/... of a GPTQ head): this rank's rows."""
        if not self.quantized:
            return super().load(name, source, shard)
        rows = WeightShard(0, self.start, self.end - self.start)
        return self.linear_method.load_weight(self, name, source, rows)
