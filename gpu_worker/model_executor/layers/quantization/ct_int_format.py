"""compressed-tensors integer weights (``quant_method: "compressed-tensors"``, ``format:
"pack-quantized"``: llm-compressor's W4A16 and W8A16 schemes, the ``quantized.w4a16`` models
published for Llama, Qwen and Mistral) -> :class:`kernels.quant_reference.WnA16Weight`
(DECISIONS 149).

A linear with ``K`` inputs, ``N`` outputs and ``bits``-bit weights (``p = 32 / bits`` per int32
word) holds:
- ``weight_packed`` int32 ``[N, K / p]``: input ``p j + i`` of output ``n`` in bits
  ``bits * i`` and up of word ``[n, j]``, unsigned: ``u = q + 2^(bits - 1)`` for the signed
  integer ``q``;
- ``weight_scale`` ``[N, G]`` in the checkpoint's float dtype (bfloat16 as llm-compressor writes
  it): ``G = K / group_size`` for strategy ``group``, 1 for ``channel``;
- ``weight_zero_point`` int32 ``[N / p, G]`` (asymmetric only): the signed zero points packed the
  same way along the outputs, unsigned (``z_u = z + 2^(bits - 1)``);
- ``weight_g_idx`` int ``[K]`` (``actorder: "group"`` only): the group of each input;
- ``weight_shape`` int ``[2]``: ``(N, K)``.
Dequantized: ``w[n, k] = scale[n, g] * (q - z) = scale[n, g] * (u - z_u)``, ``g = g_idx[k]``
(``k // group_size`` without one).

Conversion (exact): the little-endian bytes of ``weight_packed`` are our layout as they are (4
bits: byte ``b`` holds inputs ``2b`` and ``2b + 1`` in its low and high nibble; 8 bits: byte
``k`` is input ``k``). Symmetric weights need no offsets (4-bit nibbles are offset-binary
already; 8-bit ones are stored signed, ``u - 128``); asymmetric ones keep ``u`` with offsets
``-z_u * scale`` in float32 (a 16-bit float times an integer below 256: exact). Scales become
float16 where every one is a float16 exactly (bfloat16 scales of ordinary weights are), else
float32. ``actorder: "group"`` reorders the inputs as GPTQ's act-order does
(:func:`~gpu_worker.model_executor.layers.quantization.gptq_format.act_order`);
``actorder: "weight"`` stores its groups in order and needs nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gpu_worker.model_executor.layers.quantization.gptq_format import (
    narrow_groups,
    pack_fields,
    shard_g_idx,
    unpack_fields,
)
from kernels.quant_reference import WnA16Weight

FORMAT = "pack-quantized"
NAMES = frozenset({"weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape"})


@dataclass(frozen=True)
class CtIntConfig:
    """The fields of a compressed-tensors integer ``quantization_config`` that loading needs."""

    bits: int = 4
    group_size: int = 128  # -1: strategy channel, one group over the whole input dim
    symmetric: bool = True
    actorder: str | None = None  # None, "weight" (groups stored in order) or "group" (g_idx)
    ignore: tuple[str, ...] = ()  # modules left 16-bit (names or ``re:`` patterns)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"compressed-tensors: only 4- and 8-bit integer weights are supported, "
                             f"got num_bits={self.bits}")
        if self.group_size != -1 and (self.group_size < 16 or self.group_size % 16):
            raise ValueError(f"compressed-tensors: group_size must be a multiple of 16, "
                             f"got {self.group_size}")
        if self.actorder not in (None, "weight", "group"):
            raise ValueError(f"compressed-tensors: actorder must be null, 'weight' or 'group', "
                             f"got {self.actorder!r}")

    @property
    def pack(self) -> int:
        """Values per int32 word."""
        return 32 // self.bits

    @classmethod
    def from_hf(cls, quantization_config: Mapping[str, Any]) -> CtIntConfig:
        """From an HF ``config.json`` ``quantization_config``: every config group with the same
        weight-only integer scheme, stored ``pack-quantized``; ValueError otherwise (naming what)."""
        qc = quantization_config
        if qc.get("quant_method") != "compressed-tensors":
            raise ValueError(f"not a compressed-tensors quantization_config (quant_method="
                             f"{qc.get('quant_method')!r})")
        groups = list((qc.get("config_groups") or {}).values())
        if not groups:
            raise ValueError("compressed-tensors: the quantization_config has no config_groups")
        schemes = set()
        for group in groups:
            fmt = group.get("format") or qc.get("format")
            if fmt != FORMAT:
                raise ValueError(f"compressed-tensors integer weights: only the {FORMAT!r} format is "
                                 f"supported, got {fmt!r}")
            if group.get("input_activations") or group.get("output_activations"):
                raise ValueError("compressed-tensors: quantized activations (W8A8 / W4A8 integer schemes) "
                                 "are not supported; weight-only schemes (W4A16, W8A16) are")
            w = group.get("weights") or {}
            if w.get("type") != "int":
                raise ValueError(f"compressed-tensors: integer weights expected, got {w.get('type')!r}")
            if w.get("dynamic"):
                raise ValueError("compressed-tensors: dynamic weight quantization is not a stored format")
            strategy = w.get("strategy")
            if strategy not in ("group", "channel"):
                raise ValueError(f"compressed-tensors integer weights: strategy must be group or channel, "
                                 f"got {strategy!r}")
            group_size = int(w["group_size"]) if strategy == "group" else -1
            schemes.add((int(w.get("num_bits", 0)), group_size, bool(w.get("symmetric", True)),
                         w.get("actorder")))
        if len(schemes) > 1:
            raise ValueError(f"compressed-tensors: mixed weight schemes are not supported, "
                             f"got {sorted(map(str, schemes))}")
        bits, group_size, symmetric, actorder = schemes.pop()
        return cls(bits=bits, group_size=group_size, symmetric=symmetric, actorder=actorder,
                   ignore=tuple(qc.get("ignore") or ()))


def is_ct_int(quantization_config: Mapping[str, Any]) -> bool:
    """Whether a compressed-tensors ``quantization_config`` stores integer weights (else: fp8)."""
    groups = (quantization_config.get("config_groups") or {}).values()
    return any((g.get("weights") or {}).get("type") == "int" for g in groups)


def unpack_ct(packed: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """int32 words packed along ``dim`` -> int64 unsigned fields (lowest bits first)."""
    return unpack_fields(packed, bits) if dim == 1 else unpack_fields(packed.t(), bits).t()


def pack_ct(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`unpack_ct`: unsigned integers ``< 2^bits`` -> int32 words along ``dim``
    (tests, writers; the size along ``dim`` a multiple of ``32 / bits``)."""
    return pack_fields(values, bits) if dim == 1 else pack_fields(values.t(), bits).t().contiguous()


def _scales(weight_scale: torch.Tensor) -> torch.Tensor:
    """float16 where every scale is one exactly, else float32 (module docstring)."""
    s = weight_scale.contiguous()
    half = s.to(torch.float16)
    if torch.isfinite(half).all() and torch.equal(half.to(s.dtype), s):
        return half
    return s.to(torch.float32)


def convert_ct_int(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    config: CtIntConfig,
    num_outputs: int | None = None,
    perm: torch.Tensor | None = None,
) -> WnA16Weight:
    """One compressed-tensors linear (module docstring) in our layout, exactly. ``perm``: an
    act-order layer's input order (:func:`gptq_format.act_order` of its ``weight_g_idx``): input
    ``i`` of the result is input ``perm[i]`` of the checkpoint's. ``num_outputs``: the rows of
    this (sliced) weight, for its zero points' padding (default: ``weight_packed``'s)."""
    if sys.byteorder != "little":
        raise RuntimeError("compressed-tensors repacking reinterprets int32 words as bytes: needs a "
                           "little-endian host")
    bits = config.bits
    n = num_outputs or int(weight_packed.shape[0])
    k = int(weight_packed.shape[1]) * config.pack
    group = k if config.group_size == -1 or weight_scale.shape[-1] == 1 else config.group_size
    if weight_packed.shape[0] != n or k % group or tuple(weight_scale.shape) != (n, k // group):
        raise ValueError(f"compressed-tensors: weight_packed {tuple(weight_packed.shape)} and weight_scale "
                         f"{tuple(weight_scale.shape)} do not fit {bits}-bit groups of {group}")
    words = weight_packed.to(torch.int32).contiguous()
    if perm is not None:
        words = pack_ct(unpack_ct(words, bits)[:, perm.to(torch.int64).cpu()], bits)
    packed = words.view(torch.uint8)  # [N, K * bits / 8]: our layout (module docstring)
    scales = _scales(weight_scale)
    if config.symmetric:
        if weight_zero_point is not None and bool(weight_zero_point.any()):
            raise ValueError("compressed-tensors: a symmetric scheme with nonzero weight_zero_point")
        if bits == 8:
            packed = (packed.to(torch.int16) - 128).to(torch.int8)
        return WnA16Weight(packed, scales, None, bits, group)
    if weight_zero_point is None:
        raise ValueError("compressed-tensors: an asymmetric scheme without weight_zero_point")
    zeros = unpack_ct(weight_zero_point.to(torch.int32), bits, dim=0)[:n]  # [N, G] unsigned
    if tuple(zeros.shape) != tuple(scales.shape):
        raise ValueError(f"compressed-tensors: weight_zero_point {tuple(weight_zero_point.shape)} does not "
                         f"fit weight_scale {tuple(weight_scale.shape)}")
    offsets = -(zeros.to(torch.float32) * scales.float()).contiguous()
    return WnA16Weight(packed, scales, offsets, bits, group)


def dequantize_ct(
    weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None,
    weight_g_idx: torch.Tensor | None, config: CtIntConfig,
) -> torch.Tensor:
    """float32 ``[N, K]`` by compressed-tensors' own formula (a test oracle, independent of our
    layout): signed values and zero points, ``scale * (q - z)``."""
    half = 1 << (config.bits - 1)
    q = unpack_ct(weight_packed.to(torch.int32), config.bits) - half  # [N, K] signed
    n, k = q.shape
    group = k if config.group_size == -1 else config.group_size
    g = weight_g_idx.to(torch.int64) if weight_g_idx is not None else torch.arange(k) // group
    z = torch.zeros(n, weight_scale.shape[1], dtype=torch.int64)
    if weight_zero_point is not None:
        z = unpack_ct(weight_zero_point.to(torch.int32), config.bits, dim=0)[:n] - half
    return (weight_scale.float()[:, g] * (q - z[:, g]).float()).contiguous()


def ct_slice(name: str, source: Any, start: int, length: int, dim: int, config: CtIntConfig) -> torch.Tensor:
    """This rank's part of one compressed-tensors tensor: output rows ``[start, start + length)``
    (``dim`` 0: whole words of ``weight_zero_point``) or input columns (``dim`` 1: whole words of
    ``weight_packed``, whole groups of the scales and zero points)."""
    p = config.pack
    if name in ("weight_shape", "weight_g_idx") and dim == 0:
        return source.full()  # an act-order layer's order stays whole when its rows are split
    if dim == 0:
        if name == "weight_zero_point":
            if start % p or length % p:
                raise ValueError(f"compressed-tensors packs {p} zero points per word: cannot cut "
                                 f"outputs at {start}+{length}")
            return source.narrow(0, start // p, length // p)
        return source.narrow(0, start, length)
    if name == "weight_shape":
        return source.full()
    if name == "weight_packed":
        if start % p or length % p:
            raise ValueError(f"compressed-tensors packs {p} inputs per word: cannot cut inputs at "
                             f"{start}+{length}")
        return source.narrow(1, start // p, length // p)
    if name == "weight_g_idx":
        return shard_g_idx(source, start, length, config.group_size,
                           "compressed-tensors actorder 'group' weights cannot be split by inputs: "
                           "serve this checkpoint with tensor_parallel_size=1")
    # Scales and zero points: whole groups (strategy channel: one group, in every shard).
    return narrow_groups(source, 1, start, length, config.group_size, "compressed-tensors")
