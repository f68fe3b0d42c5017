"""GPTQ checkpoints (HF ``quantization_config.quant_method == "gptq"``) -> :class:`WnA16Weight`.

A GPTQ linear holds, for ``K`` inputs, ``N`` outputs and groups of ``group_size`` inputs:
- ``qweight`` int32 ``[K * bits / 32, N]``: input ``k`` of output ``n`` in bits
  ``bits * (k % (32 / bits))`` and up of word ``qweight[k // (32 / bits), n]``;
- ``qzeros`` int32 ``[G, N * bits / 32]``: the zero point of output ``n`` packed the same way
  along ``N``;
- ``scales`` float16 ``[G, N]``; ``g_idx`` int32 ``[K]`` (the group of each input).
Dequantized: ``w[n, k] = scales[g, n] * (q[k, n] - zero[g, n])`` with ``g = g_idx[k]``.

Zero points: AutoGPTQ/optimum (``checkpoint_format: "gptq"``, the HF default) store
``zero - 1`` and every GPTQ inference kernel adds the 1 back after unpacking the field, so a
stored field ``z`` means zero point ``z + 1`` (1..16 for 4 bits; zero 0, which the packer
writes as -1 and so also floods the fields above it, reads back as 16: we reproduce what
those kernels compute). GPTQModel's ``checkpoint_format: "gptq_v2"`` stores the zero point
itself. Symmetric checkpoints (``sym: true``) have zero point ``2^(bits - 1)`` everywhere.

Conversion (exact): the little-endian bytes of ``qweight`` transposed to ``[N, K*bits/32]``
are our ``[N, K / 2]`` nibble layout (4 bits) or ``[N, K]`` bytes (8 bits). Scales become
``[N, G]`` float16; zero points become offsets ``-zero * scale`` in float32 (products of a
float16 and a 5-bit integer are exact there, and ``q * s - z * s`` equals ``s * (q - z)``
exactly), or no offsets at all when every zero point is ``2^(bits - 1)`` (symmetric).
Act-order (``desc_act: true``): GPTQ quantized the inputs in decreasing activation order, so a
group is ``group_size`` inputs scattered over K and ``g_idx[k]`` names input ``k``'s group. Our
layout needs each group contiguous: :func:`act_order` gives the input order ``perm`` that makes
them so (``g_idx[perm]`` is ``k // group_size``), :func:`permute_inputs` reorders ``qweight``'s
inputs by it (exact: fields move, none changes), and the layer multiplies ``x[..., perm]`` by the
result, which is the same sum in another order (vLLM's Marlin does the same). A row-parallel
shard of an act-order layer holds inputs of every group, a number per group that is not
``group_size``: refused (serve such checkpoints with ``tensor_parallel_size=1``, or with the
rows split only: q/k/v, gate/up and the head split by outputs, which keeps ``g_idx`` whole).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kernels.quant_reference import WnA16Weight

_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GptqConfig:
    """The fields of an HF GPTQ ``quantization_config`` that the conversion needs."""

    bits: int = 4
    group_size: int = 128  # -1: one group over the whole input dim
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"
    # The LM head is stored quantized too (``lm_head.qweight`` ...; GPTQModel's and AutoGPTQ's
    # ``lm_head: true``, vLLM's ``lm_head_quantized``); else it is a 16-bit ``lm_head.weight``.
    lm_head: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"GPTQ: only 4- and 8-bit weights are supported, got bits={self.bits}")
        if self.group_size != -1 and (self.group_size < 16 or self.group_size % 16):
            raise ValueError(f"GPTQ: group_size must be -1 or a multiple of 16, got {self.group_size}")
        if self.checkpoint_format not in _FORMATS:
            raise ValueError(f"GPTQ: checkpoint_format must be in {_FORMATS}, got {self.checkpoint_format!r}")

    @classmethod
    def from_hf(cls, quantization_config: Mapping[str, Any]) -> GptqConfig:
        """From an HF ``config.json`` ``quantization_config`` (``quant_method: "gptq"``)."""
        method = quantization_config.get("quant_method")
        if method != "gptq":
            raise ValueError(f"not a GPTQ quantization_config (quant_method={method!r})")
        return cls(
            bits=int(quantization_config.get("bits", 4)),
            group_size=int(quantization_config.get("group_size", 128)),
            sym=bool(quantization_config.get("sym", True)),
            desc_act=bool(quantization_config.get("desc_act", False)),
            checkpoint_format=str(quantization_config.get("checkpoint_format", "gptq")),
            lm_head=bool(quantization_config.get("lm_head", False)),
        )


def unpack_fields(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[..., C]`` -> int64 ``[..., C * 32 / bits]`` fields (lowest bits first)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    fields = (packed.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    return fields.reshape(*packed.shape[:-1], packed.shape[-1] * per_word)


def pack_fields(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_fields`: unsigned integers ``< 2^bits`` ``[R, C]`` -> int32
    ``[R, C * bits / 32]`` words (the int32 with those bits; ``C`` a multiple of ``32 / bits``)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (fields.to(torch.int64).reshape(fields.shape[0], -1, per_word) << shifts).sum(-1)  # < 2^32
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def narrow_groups(source: Any, dim: int, start: int, length: int, group_size: int, fmt: str) -> torch.Tensor:
    """A per-group tensor's groups (along ``dim``) of a row-parallel shard of inputs ``[start,
    start + length)``: whole groups only (ValueError naming ``fmt`` otherwise); a single group
    spans every shard."""
    if int(source.shape[dim]) == 1:
        return source.full()  # type: ignore[no-any-return]
    if start % group_size or length % group_size:
        raise ValueError(f"{fmt} groups of {group_size} inputs: a row-parallel shard of {length} at {start} "
                         "cuts one")
    return source.narrow(dim, start // group_size, length // group_size)  # type: ignore[no-any-return]


def shard_g_idx(source: Any, start: int, length: int, group_size: int, refusal: str) -> torch.Tensor:
    """An act-order ``g_idx``'s inputs ``[start, start + length)`` with this shard's groups
    numbered from 0 (``group_size`` -1: one group); ValueError ``refusal`` where the shard holds
    parts of groups (act-order weights split by inputs)."""
    g_idx = source.narrow(0, start, length).to(torch.int64)
    group = int(source.shape[0]) if group_size == -1 else group_size
    own = g_idx - start // group
    if length < int(source.shape[0]) and not groups_in_order(own, group):
        raise ValueError(refusal)
    return own  # type: ignore[no-any-return]


def gptq_zero_points(qzeros: torch.Tensor, config: GptqConfig) -> torch.Tensor:
    """int64 ``[G, N]`` zero points as GPTQ kernels use them (module docstring)."""
    zeros = unpack_fields(qzeros, config.bits)
    return zeros + 1 if config.checkpoint_format == "gptq" else zeros


def _contiguous_groups(k: int, group_size: int) -> torch.Tensor:
    """``g_idx`` of ``k`` inputs in groups of consecutive inputs (-1: one group)."""
    return torch.arange(k, dtype=torch.int64) // (k if group_size == -1 else group_size)


def groups_in_order(g_idx: torch.Tensor, group_size: int) -> bool:
    """Whether ``g_idx`` is ``k // group_size`` (no act-order reordering needed)."""
    return torch.equal(g_idx.to(torch.int64).cpu(), _contiguous_groups(g_idx.shape[0], group_size))


def act_order(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The input order that makes an act-order layer's groups contiguous (module docstring):
    ``perm`` (int64, on the CPU) with ``g_idx[perm] == arange(K) // group_size``; None where
    ``g_idx`` is that already. ValueError where a group does not have ``group_size`` inputs."""
    if groups_in_order(g_idx, group_size):
        return None
    g = g_idx.to(torch.int64).cpu()
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], _contiguous_groups(g.shape[0], group_size)):
        raise ValueError(f"GPTQ: g_idx does not give every group {group_size} inputs")
    return perm


def permute_inputs(qweight: torch.Tensor, perm: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ ``qweight`` (int32 ``[K * bits / 32, N]``) with its inputs in the order ``perm``:
    input ``i`` of the result is input ``perm[i]`` of ``qweight`` (fields moved, exact)."""
    fields = unpack_fields(qweight.to(torch.int32).t(), bits)[:, perm]  # [N, K] in the new order
    return pack_fields(fields, bits).t().contiguous()


def convert_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    config: GptqConfig,
) -> WnA16Weight:
    """One GPTQ linear (tensors as in the module docstring) in our layout, exactly."""
    if sys.byteorder != "little":
        raise RuntimeError("GPTQ repacking reinterprets int32 words as bytes: needs a little-endian host")
    bits = config.bits
    k = qweight.shape[0] * 32 // bits
    n = qweight.shape[1]
    group_size = k if config.group_size == -1 else config.group_size
    if k % group_size:
        raise ValueError(f"GPTQ: K={k} is not a multiple of group_size={group_size}")
    num_groups = k // group_size
    if tuple(scales.shape) != (num_groups, n) or qzeros.shape[0] != num_groups:
        raise ValueError(f"GPTQ: scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not match "
                         f"qweight {tuple(qweight.shape)} with group_size {group_size}")
    if g_idx is not None and not groups_in_order(g_idx, group_size):
        raise ValueError("GPTQ: act-order weights (g_idx not k // group_size) must have their "
                         "inputs reordered first (act_order, permute_inputs)")

    packed = qweight.to(torch.int32).t().contiguous().view(torch.uint8)  # [N, K * bits / 8]
    zeros = gptq_zero_points(qzeros.to(torch.int32), config)[:, :n].t()  # [N, G]
    scales_t = scales.t().clone(memory_format=torch.contiguous_format)  # [N, 1] too: strides (1, 1)
    half = 1 << (bits - 1)
    if bool((zeros == half).all()):
        # Symmetric: 4-bit nibbles are offset-binary already (the kernel subtracts 8);
        # 8-bit values are stored signed.
        if bits == 8:
            packed = (packed.to(torch.int16) - half).to(torch.int8)
        offsets = None
    else:
        # contiguous: the product of the transposed zeros and the scales may keep the zeros'
        # strides, and the kernels read offsets with the scales' strides.
        offsets = -(zeros.to(torch.float32) * scales_t.float()).contiguous()
    return WnA16Weight(packed, scales_t.to(torch.float16), offsets, bits, group_size)


def dequantize_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
    config: GptqConfig,
) -> torch.Tensor:
    """float32 ``[N, K]`` by the GPTQ formula itself (a test oracle, independent of our layout)."""
    q = unpack_fields(qweight.to(torch.int32).t(), config.bits)  # [N, K]
    k = q.shape[1]
    group_size = k if config.group_size == -1 else config.group_size
    g = g_idx.to(torch.int64) if g_idx is not None else torch.arange(k) // group_size
    zeros = gptq_zero_points(qzeros.to(torch.int32), config)[:, : q.shape[0]]  # [G, N]
    return (scales.float()[g].t() * (q - zeros[g].t()).float()).contiguous()
