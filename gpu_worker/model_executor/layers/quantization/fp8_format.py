"""FP8 weights: e4m3 with one float32 scale per output channel (what :func:`kernels` ``fp8_linear`` reads).

Three sources:
- 16/32-bit checkpoints, quantized at load: :func:`quantize_fp8_per_channel` (the row's
  absolute maximum maps to 448; :func:`kernels.quant_reference.quantize_fp8_rows`);
- pre-quantized checkpoints, loaded as they are (no requantization): compressed-tensors
  ``float-quantized`` (``weight`` e4m3 + ``weight_scale`` per tensor or per channel, as
  published for Llama 3) and HF ``quant_method: "fp8"`` without ``weight_block_size``
  (``weight_scale_inv`` per tensor). :func:`fp8_scales_per_channel` turns their scales into
  ours; a per-tensor scale broadcasts exactly. Block-wise scales (HF ``weight_block_size``,
  compressed-tensors strategy ``block``: DeepSeek-V3 and the Qwen3 FP8 checkpoints) are served
  as they are by :mod:`~gpu_worker.model_executor.layers.quantization.fp8_block`
  (:attr:`Fp8CheckpointFormat.block`).
  Static activation scales (``input_scale``) are ignored: activations are always quantized
  per token, dynamically (at least as accurate).
- the CPU "fp8-emulated" path: :func:`fp8_emulated_weight`, the weight quantized and
  dequantized with the GPU path's rounding (activations: ``kernels.quant_reference.fp8_linear``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kernels.quant_reference import FP8_DTYPE, check_fp8_block, dequantize_fp8, quantize_fp8_rows

# Compute capability from which GPUs convert and multiply e4m3 natively (Ada, Hopper, ...).
FP8_MIN_CAPABILITY = (8, 9)


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[N, K]`` -> ``(w_fp8 [N, K] e4m3, scale [N] float32)``, per output channel."""
    q, scale = quantize_fp8_rows(weight)
    return q, scale.reshape(-1)


def fp8_emulated_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` after a per-channel fp8 round trip, in its own dtype (CPU emulation)."""
    q, scale = quantize_fp8_per_channel(weight)
    return dequantize_fp8(q, scale, weight.dtype)


def fp8_supported(device: torch.device | str) -> bool:
    """Whether ``device`` runs our fp8 kernels natively (CUDA, compute capability >= 8.9)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def require_fp8(device: torch.device | str) -> None:
    """Raise a clear error where fp8 weights cannot be served natively."""
    device = torch.device(device)
    if fp8_supported(device):
        return
    if device.type == "cuda" and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(
            f"fp8 weights need a GPU with compute capability >= 8.9 (Ada, Hopper or newer); "
            f"{name} has {cap[0]}.{cap[1]}"
        )
    raise RuntimeError(f"fp8 weights need a CUDA GPU (compute capability >= 8.9), not {device}")


@dataclass(frozen=True)
class Fp8CheckpointFormat:
    """How a pre-quantized fp8 checkpoint names and scales its weights."""

    scale_name: str  # the tensor next to ``weight``: "weight_scale" or "weight_scale_inv"
    per_channel: bool  # False: one scale per tensor (or per block)
    ignore: tuple[str, ...] = ()  # modules left unquantized (e.g. "lm_head")
    block: tuple[int, int] | None = None  # (block_n, block_k): one scale per block of the weight


def parse_fp8_checkpoint(quantization_config: Mapping[str, Any]) -> Fp8CheckpointFormat:
    """The format of a pre-quantized fp8 checkpoint from its HF ``quantization_config``.

    Accepts compressed-tensors (``quant_method: "compressed-tensors"``, float 8-bit weights,
    strategy ``tensor``, ``channel`` or ``block`` with its ``block_structure``) and HF
    ``quant_method: "fp8"`` (one scale per tensor, or per block with ``weight_block_size``).
    """
    method = quantization_config.get("quant_method")
    if method == "fp8":
        ignore = tuple(quantization_config.get("modules_to_not_convert") or ())
        block_size = quantization_config.get("weight_block_size")
        block = _block(block_size) if block_size else None
        return Fp8CheckpointFormat("weight_scale_inv", per_channel=False, ignore=ignore, block=block)
    if method == "compressed-tensors":
        groups = quantization_config.get("config_groups") or {}
        strategies = set()
        structures = set()
        for group in groups.values():
            w = group.get("weights") or {}
            if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8:
                raise ValueError(f"compressed-tensors: only float 8-bit weights are fp8, got {w}")
            strategies.add(w.get("strategy"))
            if w.get("strategy") == "block":
                structures.add(_block(w.get("block_structure")))
        if not strategies or not strategies <= {"tensor", "channel", "block"}:
            raise ValueError(f"compressed-tensors fp8: strategy must be tensor, channel or block, "
                             f"got {strategies}")
        if len(strategies) > 1 or len(structures) > 1:
            raise ValueError("compressed-tensors fp8: mixed weight strategies are not supported")
        ignore = tuple(quantization_config.get("ignore") or ())
        return Fp8CheckpointFormat("weight_scale", per_channel=strategies == {"channel"}, ignore=ignore,
                                   block=structures.pop() if structures else None)
    raise ValueError(f"not an fp8 quantization_config (quant_method={method!r})")


def _block(value: Any) -> tuple[int, int]:
    """A checkpoint's block size (``[block_n, block_k]``), checked for our kernels."""
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"fp8 block size must be [block_n, block_k] integers, got {value!r}")
    return check_fp8_block((value[0], value[1]))


def fp8_scales_per_channel(weight_scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """A checkpoint's weight scale (``[]``, ``[1]``, ``[N]`` or ``[N, 1]``) as our ``[N]`` float32."""
    s = weight_scale.to(torch.float32).reshape(-1)
    if s.numel() == 1:
        return s.expand(out_features).contiguous()
    if s.numel() != out_features:
        raise ValueError(f"fp8 weight scale of {s.numel()} elements for {out_features} output channels "
                         "(block-wise scales are not per-channel)")
    return s.contiguous()


def check_fp8_weight(w_fp8: torch.Tensor) -> torch.Tensor:
    """A checkpoint's fp8 weight, checked (e4m3, ``[N, K]``) and made contiguous."""
    if w_fp8.dtype != FP8_DTYPE or w_fp8.dim() != 2:
        raise ValueError(f"fp8 weight must be a 2-D {FP8_DTYPE}, got {w_fp8.dtype} {tuple(w_fp8.shape)}")
    return w_fp8.contiguous()
