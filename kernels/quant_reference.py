"""Torch references of the quantized ops, and the packed weight layout they share.

FP8 (W8A8): float8 e4m3 weights with one float32 scale per output channel, activations
quantized per token on the fly. Block-wise FP8 (DeepSeek-style checkpoints): one scale per
``[block_n, block_k]`` block of the weight, activations quantized per token in groups of
``block_k`` inputs, each block's product scaled by its two scales
(:func:`fp8_block_linear`). Both quantizations use :func:`quantize_fp8_rows`: the row's
absolute maximum (floored at :data:`FP8_MIN_AMAX`) maps to :data:`FP8_E4M3_MAX`, ``q =
e4m3(clamp(x * (448 / amax)))`` (one float32 multiply, round to nearest even) and ``scale =
amax / 448``. The Triton kernels do the same float32 operations, so quantized values agree
bit for bit; products of two e4m3 values are exact in float32, so the fp8 linear differs
from this reference only in the order of its float32 sums.

WnA16: 4- or 8-bit integer weights in groups along the input dim, each group with a
scale and an optional offset (:class:`WnA16Weight`), dequantized to the activation dtype
and multiplied in 16/32-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0
# Floor of a row's absolute maximum: an all-zero row gets a tiny, finite scale, not 0/0.
FP8_MIN_AMAX = 1e-12


def quantize_fp8_rows(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic fp8 quantization of each row (last dim) of ``x``.

    Returns ``(q, scale)``: ``q`` e4m3 of ``x``'s shape, ``scale`` float32 of shape
    ``[..., 1]`` with ``x ~= q.float() * scale``. ``amax`` (``[..., 1]``): each row's absolute
    maximum when the row is longer than ``x`` holds (a row-parallel shard of a weight: the
    maximum over every rank's columns); default ``x``'s own.
    """
    xf = x.float()
    if amax is None:
        amax = xf.abs().amax(dim=-1, keepdim=True)
    amax = amax.float().clamp_min(FP8_MIN_AMAX)
    inv = _true_div(FP8_E4M3_MAX, amax)
    q = (xf * inv).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    return q, _true_div(amax, FP8_E4M3_MAX)


def _true_div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """``a / b`` in float32 rounded once, as the kernels' ``div_rn``. Torch computes
    ``scalar / tensor`` as a reciprocal times the scalar, and on CUDA ``tensor / scalar`` as a
    multiply by the scalar's reciprocal (two roundings each); tensor / tensor is one division."""
    ref = a if isinstance(a, torch.Tensor) else b
    assert isinstance(ref, torch.Tensor)
    ta = a if isinstance(a, torch.Tensor) else torch.full_like(ref, a, dtype=torch.float32)
    tb = b if isinstance(b, torch.Tensor) else torch.full_like(ref, b, dtype=torch.float32)
    return torch.div(ta.float(), tb.float())


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token activation quantization: ``x`` ``[M, K]`` -> ``(x_fp8 [M, K], scale [M, 1] float32)``."""
    return quantize_fp8_rows(x)


@dataclass(frozen=True)
class Fp8Activation:
    """Activations already quantized per token for an fp8 (W8A8) linear: what a norm or an
    activation fused with the quantization (``rms_norm_fp8``, ``fused_add_rms_norm_fp8``,
    ``silu_and_mul_fp8``) hands to the next projection, so the linear skips its own
    :func:`quantize_fp8_per_token` (the same values, bit for bit).

    ``q`` ``[..., K]`` e4m3, ``scale`` ``[..., 1]`` float32, ``dtype`` the unquantized
    activations' dtype (the linear's output dtype)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @staticmethod
    def of(x: torch.Tensor) -> Fp8Activation:
        """``x`` quantized per token (:func:`quantize_fp8_rows` over its last dim)."""
        q, scale = quantize_fp8_rows(x)
        return Fp8Activation(q, scale, x.dtype)


def quantize_fp8_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 of ``x / scale`` for a given float32 ``scale`` (broadcast against ``x``), computed as
    ``x * (1 / scale)`` with the reciprocal rounded once, then clamped to +-448 (the KV store)."""
    inv = _true_div(1.0, scale)
    return (x.float() * inv).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


def fp8_linear(
    x: torch.Tensor | Fp8Activation,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 linear: ``x`` ``[..., K]`` (bf16/fp16/fp32), ``w_fp8`` ``[N, K]`` e4m3, ``w_scale``
    ``[N]`` float32, ``bias`` ``[N]`` or None. Returns ``[..., N]`` in ``x.dtype``.

    ``x`` is quantized per token (:func:`quantize_fp8_per_token`), unless it is an
    :class:`Fp8Activation` already; the product is accumulated in float32 and scaled by
    ``x_scale[m] * w_scale[n]``, then the bias is added.
    """
    n, k = w_fp8.shape
    if isinstance(x, Fp8Activation):
        xq, xs = x.q.reshape(-1, k), x.scale.reshape(-1, 1)
    else:
        xq, xs = quantize_fp8_per_token(x.reshape(-1, k))
    y = (xq.float() @ w_fp8.float().t()) * xs * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def fp8_weight_only_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A16 linear (fp8 weights, the activation as it is): ``x`` ``[..., K]`` 16/32-bit, the
    rest as in :func:`fp8_linear`. ``(x @ w_q.T)`` in float32, times ``w_scale[n]``, plus the
    bias, in ``x.dtype``: what one-token decode runs (``KernelOps.fp8_weight_only_max_m``)."""
    n, k = w_fp8.shape
    y = (x.reshape(-1, k).float() @ w_fp8.float().t()) * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def dequantize_fp8(
    w_fp8: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``w_fp8`` ``[N, K]`` times its per-channel ``w_scale`` ``[N]``, in float32, cast to ``dtype``."""
    return (w_fp8.float() * w_scale.float()[:, None]).to(dtype)


def fp8_kv_scale(x: torch.Tensor, per_head: bool) -> torch.Tensor:
    """A KV-cache scale computed from ``x`` ``[T, Hk, D]``: float32 ``[Hk]`` (per head) or ``[1]``."""
    xf = x.float().abs()
    amax = xf.amax(dim=(0, 2)) if per_head else xf.amax().reshape(1)
    return _true_div(amax.clamp_min(FP8_MIN_AMAX), FP8_E4M3_MAX)


# ---------------------------------------------------------------------------------------
# Block-wise FP8
# ---------------------------------------------------------------------------------------


def check_fp8_block(block: tuple[int, int]) -> tuple[int, int]:
    """A weight block ``(block_n, block_k)`` as the kernels take it: ``block_n`` >= 1 rows,
    ``block_k`` a power of two >= 16 inputs (a GEMV tile holds whole blocks or part of one)."""
    if len(block) != 2:
        raise ValueError(f"an fp8 weight block is (block_n, block_k), got {block!r}")
    bn, bk = (int(b) for b in block)
    if bn < 1 or bk < 16 or bk & (bk - 1):
        raise ValueError(f"fp8 weight block {block!r}: block_n must be >= 1 and block_k a power of two >= 16")
    return bn, bk


def fp8_block_scale_shape(n: int, k: int, block: tuple[int, int]) -> tuple[int, int]:
    """The ``[ceil(N / block_n), ceil(K / block_k)]`` shape of an ``[N, K]`` weight's block scales."""
    bn, bk = block
    return -(-n // bn), -(-k // bk)


def fp8_block_row_scales(w_scale: torch.Tensor, n: int, block_n: int) -> torch.Tensor:
    """Block scales ``[ceil(N / bn), KB]`` as one row per output channel, ``[N, KB]`` float32."""
    return w_scale.float().repeat_interleave(block_n, dim=0)[:n]


def dequantize_fp8_blocks(
    w_fp8: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``w_fp8`` ``[N, K]`` times the scale of its block (``w_scale`` ``[ceil(N/bn), ceil(K/bk)]``),
    in float32, cast to ``dtype``."""
    n, k = w_fp8.shape
    bn, bk = block
    s = fp8_block_row_scales(w_scale, n, bn).repeat_interleave(bk, dim=1)[:, :k]
    return (w_fp8.float() * s).to(dtype)


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[N, K]`` -> ``(e4m3 [N, K], scales [ceil(N/bn), ceil(K/bk)] float32)``: each block's
    absolute maximum maps to 448 (what DeepSeek-style checkpoints hold; random weights, tests)."""
    n, k = w.shape
    bn, bk = block
    nb, kb = fp8_block_scale_shape(n, k, block)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    tiles = padded.reshape(nb, bn, kb, bk).permute(0, 2, 1, 3).reshape(nb, kb, bn * bk)
    q, scale = quantize_fp8_rows(tiles)
    q = q.reshape(nb, kb, bn, bk).permute(0, 2, 1, 3).reshape(nb * bn, kb * bk)[:n, :k].contiguous()
    return q, scale.reshape(nb, kb)


def quantize_fp8_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[M, K]`` quantized per token in groups of ``group`` inputs (``K % group == 0``):
    ``(x_fp8 [M, K], scale [M, K / group] float32)``, each group as :func:`quantize_fp8_rows`."""
    m, k = x.shape
    if k % group:
        raise ValueError(f"per-token-group quantization needs K ({k}) to be a multiple of {group}")
    q, scale = quantize_fp8_rows(x.reshape(-1, group))
    return q.reshape(m, k), scale.reshape(m, k // group)


def fp8_block_linear(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-wise W8A8 linear: ``x`` ``[..., K]`` quantized per token in groups of ``block_k``
    (:func:`quantize_fp8_per_token_group`), ``w_fp8`` ``[N, K]`` e4m3 with ``w_scale``
    ``[ceil(N/bn), K/bk]``. Each ``block_k`` slice's product is summed in float32 and scaled by
    the token group's and the weight block's scales, the slices added in order, then the bias:
    ``[..., N]`` in ``x.dtype``."""
    n, k = w_fp8.shape
    bn, bk = block
    xq, xs = quantize_fp8_per_token_group(x.reshape(-1, k), bk)
    ws = fp8_block_row_scales(w_scale, n, bn)
    y = torch.zeros(xq.shape[0], n, dtype=torch.float32, device=x.device)
    for j in range(k // bk):
        part = xq[:, j * bk : (j + 1) * bk].float() @ w_fp8[:, j * bk : (j + 1) * bk].float().t()
        y += part * xs[:, j : j + 1] * ws[None, :, j]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def fp8_block_weight_only_linear(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-wise W8A16 (the activation as it is): ``x @ dequantize_fp8_blocks(w).T`` in float32,
    plus the bias, in ``x.dtype`` (what one-token decode runs, as :func:`fp8_weight_only_linear`)."""
    n, k = w_fp8.shape
    y = x.reshape(-1, k).float() @ dequantize_fp8_blocks(w_fp8, w_scale, block).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------
# WnA16
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WnA16Weight:
    """A grouped integer weight in the kernels' layout (docs/QUANTIZATION.md).

    ``qweight``: 4 bits: ``[N, K // 2]`` uint8, byte ``j`` of row ``n`` holds input ``2j`` in
    its low nibble and ``2j + 1`` in its high nibble; 8 bits: ``[N, K]`` int8 or uint8.
    ``scales``/``offsets``: ``[N, K // group_size]`` float16 or float32; ``offsets`` None
    means symmetric. Dequantized: ``w[n, k] = q * scales[n, g] + offsets[n, g]`` with
    ``g = k // group_size``, where ``q`` is the stored integer, minus 8 for 4-bit weights
    without offsets (a signed nibble in offset-binary); 8-bit weights without offsets are
    stored signed (int8).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        n, k = self.out_features, self.in_features
        if self.bits == 4:
            if self.qweight.dtype != torch.uint8:
                raise ValueError(f"4-bit qweight must be uint8, got {self.qweight.dtype}")
        elif self.bits == 8:
            if self.qweight.dtype not in (torch.int8, torch.uint8):
                raise ValueError(f"8-bit qweight must be int8 or uint8, got {self.qweight.dtype}")
            if self.offsets is None and self.qweight.dtype != torch.int8:
                raise ValueError("8-bit weights without offsets must be stored signed (int8)")
        else:
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size < 16 or self.group_size % 16 or k % self.group_size:
            raise ValueError(f"group_size {self.group_size} must be a multiple of 16 dividing K={k}")
        want = (n, k // self.group_size)
        for name in ("scales", "offsets"):
            t = getattr(self, name)
            if t is None:
                continue
            if tuple(t.shape) != want or t.dtype not in (torch.float16, torch.float32):
                raise ValueError(f"{name} must be float16/float32 {want}, got {t.dtype} {tuple(t.shape)}")

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1]) * (2 if self.bits == 4 else 1)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight, scales and offsets."""
        parts = [self.qweight, self.scales] + ([self.offsets] if self.offsets is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def select_rows(self, index: torch.Tensor) -> WnA16Weight:
        """The output channels ``index`` (a row permutation or a shard): exact, rows are independent."""
        return WnA16Weight(
            self.qweight.index_select(0, index),
            self.scales.index_select(0, index),
            None if self.offsets is None else self.offsets.index_select(0, index),
            self.bits,
            self.group_size,
        )

    def select_inputs(self, start: int, length: int) -> WnA16Weight:
        """Input columns ``[start, start + length)`` (a row-parallel shard): whole groups only,
        or any range of a weight with a single group (its scale applies to every column)."""
        g = self.group_size
        single = self.in_features == g
        if not single and (start % g or length % g):
            raise ValueError(f"input range [{start}, {start + length}) does not cut whole groups of {g}")
        if self.bits == 4 and (start % 2 or length % 2):
            raise ValueError("4-bit weights split at even input columns only")
        per_byte = 2 if self.bits == 4 else 1
        qweight = self.qweight[:, start // per_byte : (start + length) // per_byte]
        groups = slice(0, 1) if single else slice(start // g, (start + length) // g)
        offsets = None if self.offsets is None else self.offsets[:, groups]
        group_size = length if single else g
        return WnA16Weight(qweight.contiguous(), self.scales[:, groups].contiguous(),
                           None if offsets is None else offsets.contiguous(), self.bits, group_size)

    def to(self, device: torch.device | str) -> WnA16Weight:
        return WnA16Weight(
            self.qweight.to(device),
            self.scales.to(device),
            None if self.offsets is None else self.offsets.to(device),
            self.bits,
            self.group_size,
        )


def concat_rows(weights: list[WnA16Weight]) -> WnA16Weight:
    """Stack weights along the output dim (fused QKV, gate/up). They must share bits, group
    size, signedness and whether they have offsets; scales/offsets are widened to float32 when
    their dtypes differ (exact)."""
    first = weights[0]
    if any(w.bits != first.bits or w.group_size != first.group_size or w.qweight.dtype != first.qweight.dtype
           or (w.offsets is None) != (first.offsets is None) for w in weights):
        raise ValueError("concat_rows: weights differ in bits, group size, storage or offsets")

    def cat(ts: list[torch.Tensor]) -> torch.Tensor:
        dtype = ts[0].dtype if all(t.dtype == ts[0].dtype for t in ts) else torch.float32
        return torch.cat([t.to(dtype) for t in ts])

    offsets = None if first.offsets is None else cat([w.offsets for w in weights if w.offsets is not None])
    return WnA16Weight(
        torch.cat([w.qweight for w in weights]), cat([w.scales for w in weights]), offsets,
        first.bits, first.group_size,
    )


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` values 0..15 (any integer dtype) -> ``[N, K // 2]`` uint8 (even k low nibble)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[N, K // 2]`` uint8 -> ``[N, K]`` uint8."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_wna16(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """The float32 ``[N, K]`` weight of a packed WnA16 weight (see :class:`WnA16Weight`):
    ``q * scale`` then ``+ offset``, each rounded once in float32."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    qf = q.float()
    if bits == 4 and offsets is None:
        qf -= 8.0
    w = qf * scales.float().repeat_interleave(group_size, dim=1)
    if offsets is not None:
        w += offsets.float().repeat_interleave(group_size, dim=1)
    return w


def wna16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` dequantized (:func:`dequantize_wna16`) and rounded to
    ``x.dtype``, the product accumulated in float32: what a 16-bit layer holding the
    dequantized weight computes. ``x`` ``[..., K]``; returns ``[..., N]`` in ``x.dtype``."""
    w = dequantize_wna16(qweight, scales, offsets, bits, group_size).to(x.dtype)
    k = w.shape[1]
    y = x.reshape(-1, k).float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
