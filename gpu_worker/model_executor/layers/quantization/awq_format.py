"""AWQ checkpoints (HF ``quantization_config.quant_method == "awq"``, AutoAWQ's GEMM format) ->
:class:`kernels.quant_reference.WnA16Weight` (DECISIONS 147).

An AWQ linear with ``K`` inputs, ``N`` outputs and groups of ``group_size`` inputs holds:
- ``qweight`` int32 ``[K, N / 8]``: output ``8 j + AWQ_ORDER[i]`` of input ``k`` in bits
  ``4 i .. 4 i + 3`` of ``qweight[k, j]`` (AWQ interleaves the eight outputs of a word as
  ``0 2 4 6 1 3 5 7``);
- ``qzeros`` int32 ``[K / group_size, N / 8]``: the zero points, packed the same way;
- ``scales`` float16 ``[K / group_size, N]``.
Dequantized: ``w[n, k] = scales[g, n] * (q[k, n] - zero[g, n])`` with ``g = k // group_size``
(the zero point as stored: no GPTQ-style ``- 1``).

Conversion (exact, as GPTQ's): the fields unpacked and put back in output order, transposed to
``[N, K]`` and packed two inputs per byte (our layout); scales ``[N, G]`` float16; offsets
``-zero * scale`` in float32 (exact), or none when every zero point is 8 (symmetric). Only the
GEMM format (``version: "gemm"``, what AutoAWQ and llm-compressor publish) with zero points and
4 bits exists for AWQ in practice; the GEMV format (a different packing) and others are refused
by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gpu_worker.model_executor.layers.quantization.gptq_format import narrow_groups
from kernels.quant_reference import WnA16Weight, pack_int4

# Output j of a word's eight is in its field AWQ_ORDER.index(j): field i holds output AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK = 8  # 4-bit fields per int32 word


@dataclass(frozen=True)
class AwqConfig:
    """The fields of an HF AWQ ``quantization_config`` that loading needs."""

    group_size: int = 128
    ignore: tuple[str, ...] = ()  # ``modules_to_not_convert``: left 16-bit

    def __post_init__(self) -> None:
        if self.group_size < 16 or self.group_size % 16:
            raise ValueError(f"AWQ: group_size must be a multiple of 16, got {self.group_size}")

    @classmethod
    def from_hf(cls, quantization_config: Mapping[str, Any]) -> AwqConfig:
        """From an HF ``config.json`` ``quantization_config`` (``quant_method: "awq"``)."""
        qc = quantization_config
        if qc.get("quant_method") != "awq":
            raise ValueError(f"not an AWQ quantization_config (quant_method={qc.get('quant_method')!r})")
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        version = str(qc.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm" or not qc.get("zero_point", True):
            raise ValueError(f"AWQ: only the 4-bit GEMM format with zero points is supported, got "
                             f"bits={bits}, version={version!r}, zero_point={qc.get('zero_point', True)}")
        group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
        return cls(group_size=group_size, ignore=tuple(qc.get("modules_to_not_convert") or ()))


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C / 8]`` AWQ words -> int64 ``[R, C]`` fields in output order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    fields = (packed.to(torch.int64)[..., None] >> shifts) & 0xF  # [R, C/8, field]
    out = torch.empty_like(fields)
    out[..., list(AWQ_ORDER)] = fields  # field i is output AWQ_ORDER[i] of its word
    return out.reshape(packed.shape[0], -1)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_awq`: ``[R, C]`` integers 0..15 -> int32 ``[R, C / 8]`` (tests, writers)."""
    fields = values.to(torch.int64).reshape(values.shape[0], -1, PACK)[..., list(AWQ_ORDER)]
    words = (fields << torch.arange(0, 32, 4, dtype=torch.int64)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def convert_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> WnA16Weight:
    """One AWQ linear (module docstring) in our layout, exactly. ``group_size`` may be the whole
    ``K`` of a shard that holds a single group."""
    q = unpack_awq(qweight.to(torch.int32))  # [K, N]
    k, n = q.shape
    if k % group_size or tuple(scales.shape) != (k // group_size, n) or qzeros.shape[0] != k // group_size:
        raise ValueError(f"AWQ: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
                         f"{tuple(scales.shape)} do not fit groups of {group_size}")
    zeros = unpack_awq(qzeros.to(torch.int32))[:, :n].t()  # [N, G]
    scales_t = scales.t().to(torch.float16).contiguous()  # [N, G]
    packed = pack_int4(q.t().contiguous())  # [N, K / 2]
    offsets = None if bool((zeros == 8).all()) else -(zeros.float() * scales_t.float()).contiguous()
    return WnA16Weight(packed, scales_t, offsets, 4, group_size)


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """float32 ``[N, K]`` by AWQ's formula itself (a test oracle, independent of our layout)."""
    q = unpack_awq(qweight.to(torch.int32)).float()  # [K, N]
    zeros = unpack_awq(qzeros.to(torch.int32)).float().repeat_interleave(group_size, dim=0)
    return ((q - zeros) * scales.float().repeat_interleave(group_size, dim=0)).t().contiguous()


def awq_slice(name: str, source: Any, start: int, length: int, dim: int, group_size: int) -> torch.Tensor:
    """This rank's part of one AWQ tensor: output columns ``[start, start + length)`` (``dim``
    0: whole words of ``qweight`` / ``qzeros``) or input rows (``dim`` 1: whole groups)."""
    if dim == 0:
        if name in ("qweight", "qzeros"):
            if start % PACK or length % PACK:
                raise ValueError(f"AWQ packs {PACK} outputs per word: cannot cut outputs at {start}+{length}")
            return source.narrow(1, start // PACK, length // PACK)
        return source.narrow(1, start, length)
    if name == "qweight":
        return source.narrow(0, start, length)
    return narrow_groups(source, 0, start, length, group_size, "AWQ")
