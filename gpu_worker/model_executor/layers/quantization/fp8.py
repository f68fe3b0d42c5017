"""FP8 weights (W8A8): :class:`Fp8LinearMethod`.

Each linear layer holds ``weight`` e4m3 ``[N, K]`` (the ``nn.Linear`` layout) and
``weight_scale`` float32 ``[N]`` (one per output channel); activations are quantized per token
on the fly and the product is ``ops.fp8_linear`` (DECISIONS 33-34): on CUDA the fused Triton
GEMV up to ``Fp8LinearConfig.gemv_max_m`` tokens, ``torch._scaled_mm`` (cuBLASLt) above. Steps
of at most ``ops.fp8_weight_only_max_m`` tokens (one-token decode by default) skip the
activation's quantization: ``ops.fp8_weight_only_linear`` (W8A16, DECISIONS 95). On the
CPU the torch reference, which computes what the GPU computes (same e4m3 codes, exact products,
float32 sums): the "fp8-emulated" path the accuracy tests run.

Where the weights come from:
- a 16/32-bit checkpoint is quantized as it loads, one checkpoint slice at a time (the slice is
  read, moved to the device, quantized per output channel and dropped), so loading never holds
  more than one tensor in 16 bits; the parameters are e4m3 from the start (a llama3-70b loads
  on one H200);
- a pre-quantized checkpoint (HF ``quant_method: "fp8"``, compressed-tensors fp8) is copied as
  it is, its scales broadcast per channel (exact), never requantized;
- random ("dummy") weights are drawn a few rows at a time and quantized at once.

Tensor parallelism slices e4m3 rows and their scales like 16-bit rows (column-parallel); a
row-parallel layer holds some columns of every row and the whole ``[N]`` scale vector. Quantized
at load, a row-parallel row's scale is its maximum over every rank's columns (one all-reduce
per tensor), so each rank's e4m3 codes are those of one rank: TP=2 computes what TP=1 computes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from gpu_worker.model_executor.layers.quantization.base import LinearMethod, WeightShard, param
from gpu_worker.model_executor.layers.quantization.fp8_format import (
    Fp8CheckpointFormat,
    fp8_scales_per_channel,
)
from gpu_worker.model_executor.weights import TensorSource
from kernels import KernelOps
from kernels.quant_reference import FP8_DTYPE, Fp8Activation, quantize_fp8_rows
from kernels.rope_store import RopeStore

# Rows of a random weight drawn at once: about 64M float32 values (256 MiB) whatever the shape.
_RANDOM_CHUNK_ELEMENTS = 1 << 26


class Fp8LinearMethod(LinearMethod):
    """e4m3 weights with per-output-channel float32 scales, products through ``ops.fp8_linear``.

    ``checkpoint``: the format of a pre-quantized checkpoint (None: the checkpoint is 16/32-bit
    and is quantized as it loads)."""

    takes_fp8_activation = True

    def __init__(self, ops: KernelOps, checkpoint: Fp8CheckpointFormat | None = None) -> None:
        self.ops = ops
        self.checkpoint = checkpoint

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        weight = torch.empty(out_features, in_features, dtype=FP8_DTYPE)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)

    def apply(
        self, layer: nn.Module, x: torch.Tensor | Fp8Activation, bias: torch.Tensor | None
    ) -> torch.Tensor:
        weight, scale = param(layer, "weight"), param(layer, "weight_scale")
        weight_only = self.ops.fp8_weight_only_linear
        if weight_only is not None and not isinstance(x, Fp8Activation) and self.ops.fp8_weight_only(
            x.numel() // x.shape[-1]
        ):
            y: torch.Tensor = weight_only(x, weight, scale, bias)
            return y
        out: torch.Tensor = self.ops.fp8_linear(x, weight, scale, bias)
        return out

    def apply_gated(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        gated = self.ops.fp8_weight_only_gated_linear
        if gated is None or not self.ops.fp8_weight_only(1):
            return None  # one token does not run weight-only
        y: torch.Tensor = gated(x, param(layer, "weight"), param(layer, "weight_scale"), bias)
        return y

    def apply_rope(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, rope: RopeStore
    ) -> torch.Tensor | None:
        fused = self.ops.fp8_weight_only_rope_linear
        if fused is None or not self.ops.fp8_weight_only(1):
            return None  # one token does not run weight-only (W8A8: the norm quantizes its input)
        q: torch.Tensor | None = fused(x, param(layer, "weight"), param(layer, "weight_scale"), bias, rope)
        return q

    def checkpoint_names(self) -> frozenset[str]:
        # HF fp8 names its (multiplying) scale weight_scale_inv; input_scale (static activation
        # scales) is ignored: activations are quantized per token.
        return frozenset({"weight_scale_inv", "input_scale"})

    def load_weight(
        self, layer: nn.Module, name: str, source: TensorSource, shard: WeightShard
    ) -> Iterable[str]:
        if name == "input_scale":
            return ()
        if name in ("weight_scale", "weight_scale_inv"):
            return self._load_scale(layer, source, shard)
        if name != "weight":
            raise ValueError(f"fp8 linear layers load weight and its scales, not {name!r}")
        part = shard.read(source)
        weight, weight_scale = param(layer, "weight"), param(layer, "weight_scale")
        if part.dtype == FP8_DTYPE:  # pre-quantized: as it is
            with torch.no_grad():
                _rows(weight, shard).copy_(part)
            return ("weight",)
        x = part.to(weight.device)
        amax = None
        tp = getattr(layer, "tp", None)
        if shard.dim == 1 and tp is not None and tp.size > 1:  # a row's scale spans every rank's columns
            amax = tp.all_reduce_max(x.float().abs().amax(dim=-1, keepdim=True))
        q, scale = quantize_fp8_rows(x, amax)
        with torch.no_grad():
            _rows(weight, shard).copy_(q)
            _rows(weight_scale, shard).copy_(scale.reshape(-1))
        return ("weight", "weight_scale")

    def _load_scale(self, layer: nn.Module, source: TensorSource, shard: WeightShard) -> Iterable[str]:
        """A checkpoint scale, per tensor (``[]``/``[1]``) or per channel (``[N]``/``[N, 1]``)."""
        target = _rows(param(layer, "weight_scale"), shard)
        numel = 1
        for d in source.shape:
            numel *= int(d)
        if numel == 1 or shard.dim == 1:  # per tensor, or a row-parallel layer's whole [N]
            scale = source.full()
        else:
            scale = source.narrow(0, shard.start, shard.length)
        with torch.no_grad():
            target.copy_(fp8_scales_per_channel(scale, target.shape[0]))
        return ("weight_scale",)

    def fill_random(self, layer: nn.Module, seed: int, std: float) -> bool:
        weight, weight_scale = param(layer, "weight"), param(layer, "weight_scale")
        with torch.no_grad():
            for r0, x in random_row_chunks(weight, seed, std):
                q, scale = quantize_fp8_rows(x)
                weight[r0 : r0 + x.shape[0]].copy_(q)
                weight_scale[r0 : r0 + x.shape[0]].copy_(scale.reshape(-1))
        return True


def random_row_chunks(
    weight: torch.Tensor, seed: int, std: float, row_multiple: int = 1
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, float32 normal(0, std) rows)`` covering ``weight``'s rows in chunks of about
    ``_RANDOM_CHUNK_ELEMENTS`` values (whole multiples of ``row_multiple`` rows), from one
    generator seeded with ``seed`` on ``weight``'s device: random weights drawn a few rows at a
    time, whatever the shape."""
    rows, cols = weight.shape
    generator = torch.Generator(device=weight.device)
    generator.manual_seed(seed)
    step = max(1, _RANDOM_CHUNK_ELEMENTS // max(cols * row_multiple, 1)) * row_multiple
    for r0 in range(0, rows, step):
        x = torch.empty(min(step, rows - r0), cols, dtype=torch.float32, device=weight.device)
        x.normal_(0.0, std, generator=generator)
        yield r0, x


def _rows(t: torch.Tensor, shard: WeightShard) -> torch.Tensor:
    """The rows of ``t`` a shard fills: its own (column-parallel) or all (row-parallel)."""
    return t.narrow(0, shard.dst, shard.length) if shard.dim == 0 else t
