"""Block-wise FP8 weights: :class:`Fp8BlockLinearMethod` (DECISIONS 145).

Checkpoints quantized with one float32 scale per ``[block_n, block_k]`` block of each weight
(HF ``quant_method: "fp8"`` with ``weight_block_size``, as DeepSeek-V3 and the Qwen3 FP8
releases publish; compressed-tensors strategy ``block``) load as they are: ``weight`` e4m3
``[N, K]`` and ``weight_scale`` ``[ceil(N / bn), ceil(K / bk)]``, the checkpoint's own codes and
scales. Products: ``ops.fp8_block_weight_only_linear`` (the 16-bit activation, one-token decode
by default) or ``ops.fp8_block_linear`` (activations quantized per token in groups of ``bk``),
:mod:`kernels.triton_ops.fp8_block` on CUDA, the torch references on the CPU.

Fused and sharded layers keep whole blocks: every fused part (q/k/v, gate/up) and every
tensor-parallel shard starts at a multiple of ``bn`` rows (column-parallel) or ``bk`` inputs
(row-parallel), and each rank's inputs are whole ``bk`` groups; a layout that would cut a block
is refused when it loads, naming the sizes (vLLM refuses the same layouts).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gpu_worker.model_executor.layers.quantization.base import LinearMethod, WeightShard, param
from gpu_worker.model_executor.layers.quantization.fp8 import random_row_chunks
from gpu_worker.model_executor.layers.quantization.fp8_format import Fp8CheckpointFormat
from gpu_worker.model_executor.weights import TensorSource
from kernels import KernelOps
from kernels.quant_reference import FP8_DTYPE, fp8_block_scale_shape, quantize_fp8_blocks


class Fp8BlockLinearMethod(LinearMethod):
    """e4m3 weights with one float32 scale per ``checkpoint.block`` block (module docstring)."""

    def __init__(self, ops: KernelOps, checkpoint: Fp8CheckpointFormat) -> None:
        if checkpoint.block is None:
            raise ValueError("Fp8BlockLinearMethod serves checkpoints with block-wise scales")
        if ops.fp8_block_linear is None:
            raise ValueError(f"op set {ops.name!r} has no block-wise fp8 linear")
        self.ops = ops
        self.checkpoint = checkpoint
        self.block: tuple[int, int] = checkpoint.block

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        bn, bk = self.block
        if in_features % bk:
            raise ValueError(f"block-wise fp8: a layer of {in_features} inputs (per tensor-parallel rank) "
                             f"does not hold whole blocks of {bk} inputs (weight block {bn} x {bk})")
        weight = torch.empty(out_features, in_features, dtype=FP8_DTYPE)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        scale = torch.empty(fp8_block_scale_shape(out_features, in_features, self.block), dtype=torch.float32)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight, scale = param(layer, "weight"), param(layer, "weight_scale")
        weight_only = self.ops.fp8_block_weight_only_linear
        if weight_only is not None and self.ops.fp8_weight_only(x.numel() // x.shape[-1]):
            y: torch.Tensor = weight_only(x, weight, scale, self.block, bias)
            return y
        linear = self.ops.fp8_block_linear
        assert linear is not None  # checked in __init__
        out: torch.Tensor = linear(x, weight, scale, self.block, bias)
        return out

    def apply_gated(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        gated = self.ops.fp8_block_weight_only_gated_linear
        if gated is None or not self.ops.fp8_weight_only(1):
            return None
        y: torch.Tensor = gated(x, param(layer, "weight"), param(layer, "weight_scale"), self.block, bias)
        return y

    def checkpoint_names(self) -> frozenset[str]:
        # HF fp8 names its (multiplying) block scales weight_scale_inv; input_scale is ignored:
        # activations are quantized dynamically.
        return frozenset({"weight_scale_inv", "input_scale"})

    def load_weight(
        self, layer: nn.Module, name: str, source: TensorSource, shard: WeightShard
    ) -> Iterable[str]:
        if name == "input_scale":
            return ()
        if name in ("weight_scale", "weight_scale_inv"):
            return self._load_scale(layer, source, shard)
        if name != "weight":
            raise ValueError(f"block-wise fp8 layers load weight and its scales, not {name!r}")
        self._check_shard(layer, shard)
        part = shard.read(source)
        if part.dtype != FP8_DTYPE:
            raise ValueError(f"a block-wise fp8 checkpoint's weight must be {FP8_DTYPE}, got {part.dtype}")
        weight = param(layer, "weight")
        with torch.no_grad():
            (weight.narrow(0, shard.dst, shard.length) if shard.dim == 0 else weight).copy_(part)
        return ("weight",)

    def _check_shard(self, layer: nn.Module, shard: WeightShard) -> None:
        """Refuse a fused part or tensor-parallel shard that would cut a weight block."""
        bn, bk = self.block
        if shard.dim == 1:
            if shard.start % bk or shard.length % bk:
                raise ValueError(f"block-wise fp8: inputs [{shard.start}, {shard.start + shard.length}) of a "
                                 f"row-parallel shard cut blocks of {bk} inputs; use a tensor_parallel_size "
                                 "that splits the layer at whole blocks")
            return
        rows = param(layer, "weight").shape[0]
        tail = shard.dst + shard.length == rows  # the layer's last rows may end in a partial block
        if shard.start % bn or shard.dst % bn or (shard.length % bn and not tail):
            raise ValueError(f"block-wise fp8: rows [{shard.start}, {shard.start + shard.length}) of fused "
                             f"part {shard.index} (at row {shard.dst} of {rows}) cut blocks of {bn} rows; "
                             "the checkpoint's parts and the tensor_parallel_size must split at whole blocks")

    def _load_scale(self, layer: nn.Module, source: TensorSource, shard: WeightShard) -> Iterable[str]:
        """This rank's block scales: the block rows of its weight rows, or the block columns of
        its inputs (row-parallel)."""
        self._check_shard(layer, shard)
        bn, bk = self.block
        target = param(layer, "weight_scale")
        if shard.dim == 0:
            first, count = shard.start // bn, -(-shard.length // bn)
            part = source.narrow(0, first, count)
            dst = target.narrow(0, shard.dst // bn, count)
        else:
            part = source.narrow(1, shard.start // bk, shard.length // bk)
            dst = target
        if tuple(part.shape) != tuple(dst.shape):
            raise ValueError(f"block-wise fp8 scales {tuple(part.shape)} for a slice holding "
                             f"{tuple(dst.shape)} (weight block {bn} x {bk})")
        with torch.no_grad():
            dst.copy_(part.to(torch.float32))
        return ("weight_scale",)

    def fill_random(self, layer: nn.Module, seed: int, std: float) -> bool:
        weight, weight_scale = param(layer, "weight"), param(layer, "weight_scale")
        bn = self.block[0]
        with torch.no_grad():  # chunks of whole block rows: each chunk's scales are its own
            for r0, x in random_row_chunks(weight, seed, std, row_multiple=bn):
                q, scale = quantize_fp8_blocks(x, self.block)
                weight[r0 : r0 + x.shape[0]].copy_(q)
                weight_scale[r0 // bn : r0 // bn + scale.shape[0]].copy_(scale)
        return True
