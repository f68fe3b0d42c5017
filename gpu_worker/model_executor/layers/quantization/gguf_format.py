"""GGUF block-quantized tensors -> :class:`WnA16Weight`, from the raw tensor bytes (numpy).

A GGUF weight of ``N`` rows (outputs) by ``K`` inputs is stored row-major as blocks of 32
(legacy types) or 256 (K-quants) consecutive inputs. Every type below decodes to
``w = q * scale + offset`` per group of 16 or 32 inputs with small integers ``q``, so it is
repacked exactly: our dequantization (:func:`kernels.quant_reference.dequantize_wna16`) gives
the same float32 values, bit for bit, as ``gguf.quants.dequantize`` (tested).

| type | group | container | scale | offset |
| --- | --- | --- | --- | --- |
| Q4_0 | 32 | 4-bit, ``q - 8`` | d | none |
| Q4_1 | 32 | 4-bit | d | m |
| Q5_0 | 32 | int8 ``q - 16`` | d | none |
| Q5_1 | 32 | uint8 | d | m |
| Q8_0 | 32 | int8 | d | none |
| Q2_K | 16 | 4-bit (values 0..3) | d * sc | -dmin * m |
| Q3_K | 16 | 4-bit, ``q - 8`` (values -4..3) | d * (sc - 32) | none |
| Q4_K | 32 | 4-bit | d * sc | -dmin * m |
| Q5_K | 32 | uint8 (0..31) | d * sc | -dmin * m |
| Q6_K | 16 | int8 (-32..31) | d * sc | none |

Scales and offsets are float16 when every value of the tensor is a float16 (the legacy
types: ``d`` and ``m`` are float16 in the file), else float32 (products of the super-block
float16 with the 4-6-bit sub-block scales). Other types (IQ*, TQ*, MXFP4, ...) are not exactly
representable in this layout: :func:`dequantize_gguf` gives their dense float32 weight, to be
served in 16 bits. F32/F16/BF16 tensors are dense to begin with.

Llama-family GGUF files store the Q and K projections with their rows permuted for
llama.cpp's rotary layout; :func:`llama_qk_row_order` gives the row order that undoes it (as
transformers does on load), applied with :meth:`WnA16Weight.select_rows` (exact).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from kernels.quant_reference import WnA16Weight

QK_K = 256


class _Groups(NamedTuple):
    """Decoded blocks: ``q`` ``[rows, K]``, scales/offsets ``[rows, K / group]`` float32."""

    q: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    bits: int  # container: 4 (values 0..15) or 8 (int8 when offsets is None, else uint8)
    group_size: int


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian float16 fields (``[..., 2]`` uint8) as float32 ``[...]``."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _shifts(*bits: int) -> np.ndarray:
    return np.array(bits, dtype=np.uint8)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[..., 16]`` bytes -> ``[..., 32]``: all low nibbles, then all high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins packed in Q4_K/Q5_K's 12 bytes (``[nb, 12]``)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_0(b: np.ndarray) -> _Groups:
    return _Groups(_nibbles(b[:, 2:18]), _f16(b[:, 0:2])[:, None], None, 4, 32)


def _q4_1(b: np.ndarray) -> _Groups:
    return _Groups(_nibbles(b[:, 4:20]), _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None], 4, 32)


def _q5_bits(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """5-bit values of a Q5_0/Q5_1 block: nibbles plus bit ``j`` of the 32-bit ``qh`` as bit 4."""
    high = np.unpackbits(qh, axis=-1, bitorder="little")  # [nb, 32]: bit j of the LE word
    return _nibbles(qs) | (high << 4)


def _q5_0(b: np.ndarray) -> _Groups:
    q = (_q5_bits(b[:, 2:6], b[:, 6:22]).astype(np.int16) - 16).astype(np.int8)
    return _Groups(q, _f16(b[:, 0:2])[:, None], None, 8, 32)


def _q5_1(b: np.ndarray) -> _Groups:
    return _Groups(_q5_bits(b[:, 4:8], b[:, 8:24]), _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None], 8, 32)


def _q8_0(b: np.ndarray) -> _Groups:
    return _Groups(np.ascontiguousarray(b[:, 2:34]).view(np.int8), _f16(b[:, 0:2])[:, None], None, 8, 32)


def _q2_k(b: np.ndarray) -> _Groups:
    nb = b.shape[0]
    sc, qs, d, dmin = b[:, 0:16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    # Element 128h + 32s + i: bits 2s of byte 32h + i.
    q = (qs.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    scale = d[:, None] * (sc & 0x0F).astype(np.float32)
    offset = -(dmin[:, None] * (sc >> 4).astype(np.float32))
    return _Groups(q.reshape(nb, QK_K), scale, offset, 4, 16)


def _q3_k(b: np.ndarray) -> _Groups:
    nb = b.shape[0]
    hmask, qs, packed, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = (packed[:, 0:8].reshape(nb, 1, 8) >> _shifts(0, 4).reshape(1, 2, 1)).reshape(nb, 16)
    high = (packed[:, 8:12].reshape(nb, 1, 4) >> _shifts(0, 2, 4, 6).reshape(1, 4, 1)).reshape(nb, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).astype(np.float32) - 32.0
    ql = (qs.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    hbit = (hmask.reshape(nb, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
    # q = ql - 4 * (1 - hbit) in -4..3, stored offset-binary (+8) in a nibble.
    u = ql.reshape(nb, QK_K) + 4 + 4 * hbit.reshape(nb, QK_K)
    return _Groups(u.astype(np.uint8), d[:, None] * sc, None, 4, 16)


def _q4_k(b: np.ndarray) -> _Groups:
    nb = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    # Element 64c + 32h + i: nibble h of byte 32c + i.
    q = (b[:, 16:144].reshape(nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    return _Groups(q.reshape(nb, QK_K), d[:, None] * sc, -(dmin[:, None] * mn), 4, 32)


def _q5_k(b: np.ndarray) -> _Groups:
    nb = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:176]
    ql = (qs.reshape(nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    hi = (qh.reshape(nb, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
    q = ql.reshape(nb, QK_K) | (hi.reshape(nb, QK_K) << 4)
    return _Groups(q, d[:, None] * sc, -(dmin[:, None] * mn), 8, 32)


def _q6_k(b: np.ndarray) -> _Groups:
    nb = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    low = (ql.reshape(nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = (low.reshape(nb, QK_K) | (high.reshape(nb, QK_K) << 4)).astype(np.int16) - 32
    return _Groups(q.astype(np.int8), d[:, None] * sc, None, 8, 16)


# name -> (block size, bytes per block, decoder)
_DECODERS: dict[str, tuple[int, int, Callable[[np.ndarray], _Groups]]] = {
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q8_0": (32, 34, _q8_0),
    "Q2_K": (QK_K, 84, _q2_k),
    "Q3_K": (QK_K, 110, _q3_k),
    "Q4_K": (QK_K, 144, _q4_k),
    "Q5_K": (QK_K, 176, _q5_k),
    "Q6_K": (QK_K, 210, _q6_k),
}
WNA16_TYPES = frozenset(_DECODERS)
DENSE_TYPES = frozenset({"F32", "F16", "BF16"})


def _type_name(qtype: object) -> str:
    """``"Q4_K"`` from a name, a ``gguf.GGMLQuantizationType`` or anything with ``.name``."""
    return qtype if isinstance(qtype, str) else str(getattr(qtype, "name", qtype))


def _compact(x: np.ndarray) -> torch.Tensor:
    """float16 when every value is exactly a float16, else float32."""
    with np.errstate(over="ignore"):
        half = x.astype(np.float16)
    exact = bool(np.array_equal(half.astype(np.float32), x))
    return torch.from_numpy(np.ascontiguousarray(half if exact else x))


def gguf_to_wna16(data: np.ndarray, qtype: object) -> WnA16Weight:
    """Repack one GGUF weight (``data``: its bytes, uint8 ``[N, bytes per row]`` as
    ``gguf.GGUFReader`` gives them) of type ``qtype`` (one of :data:`WNA16_TYPES`)."""
    name = _type_name(qtype)
    if name not in _DECODERS:
        raise ValueError(f"GGUF {name} is not exactly representable as WnA16; use dequantize_gguf")
    block, type_size, decode = _DECODERS[name]
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] % type_size:
        raise ValueError(f"GGUF {name}: expected [rows, k * {type_size} bytes], got {data.shape}")
    rows = data.shape[0]
    k = data.shape[1] // type_size * block
    g = decode(data.reshape(-1, type_size))
    q = g.q.reshape(rows, k)
    scales = g.scales.reshape(rows, k // g.group_size)
    offsets = None if g.offsets is None else g.offsets.reshape(rows, k // g.group_size)
    if g.bits == 4:
        packed = torch.from_numpy(np.ascontiguousarray((q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)))
    else:
        packed = torch.from_numpy(np.ascontiguousarray(q))
    return WnA16Weight(
        packed, _compact(scales), None if offsets is None else _compact(offsets), g.bits, g.group_size
    )


def dequantize_gguf(data: np.ndarray, qtype: object) -> torch.Tensor:
    """The dense float32 ``[N, K]`` weight of any GGUF tensor (the 16-bit fallback for types
    outside :data:`WNA16_TYPES`; uses the ``gguf`` package for quantized types)."""
    name = _type_name(qtype)
    if name == "F32":
        return torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
    if name == "F16":
        return torch.from_numpy(np.ascontiguousarray(data).view(np.float16).astype(np.float32))
    if name == "BF16":
        bits = np.ascontiguousarray(data).view(np.uint16).astype(np.uint32) << 16
        return torch.from_numpy(bits.view(np.float32))
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(np.ascontiguousarray(dequantize(np.asarray(data), GGMLQuantizationType[name])))


def llama_qk_row_order(num_rows: int, num_heads: int) -> torch.Tensor:
    """Row ``i`` of the HF-layout Q/K weight is row ``order[i]`` of the GGUF one.

    llama.cpp's converter interleaves the two rotary halves of each head
    (``reshape(heads, 2, D/2).swapaxes(1, 2)``); this undoes it, as transformers' GGUF
    loader does. ``num_heads``: query heads for Q, KV heads for K.
    """
    half = num_rows // num_heads // 2
    return torch.arange(num_rows).reshape(num_heads, half, 2).transpose(1, 2).reshape(-1)
