"""An RMSNorm handed over between the two linear layers around it, at one token (the contract of
the fused one-token GEMVs that take it; torch references here).

A Llama layer at one token runs ``o_proj -> fused_add_rms_norm -> gate_up`` and ``down ->
fused_add_rms_norm -> (next layer's) qkv``: the norm is a launch of its own between two weight
reads. The norm is ``rms_norm(s) = s * rstd(s) * w`` with ``s`` the residual sum, and ``rstd`` is
one scalar per token, so it factors out of the next product:

    W @ rms_norm(s) = rstd(s) * (W @ (s * w))

The linear before the norm (the *producer*: o or down) adds its product to the residual in its
epilogue and stores, for the rows it owns, the new residual ``s``, the scaled input ``s * w`` of
the next product and one float32 partial sum of squares of ``s``. The linear after it (the
*consumer*: qkv or gate_up) multiplies ``s * w`` as its input and scales its sums by ``rstd``,
the reciprocal root of the mean of the partials plus ``eps``, before its bias and activation. The
norm launch is gone; the partials are added in one fixed order (the same bits every run).

Rounding: ``s`` and ``s * w`` are rounded to the activations' dtype, as the unfused ops round the
residual sum and the norm's output; ``rstd`` is applied to the float32 sums instead of the
normalised input (the unfused norm rounds ``s * rstd`` to the dtype before multiplying by ``w``):
in float32 the two differ only by the order of products, in bf16 by the inputs' rounding
(tests state the bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import quant_reference, reference


@dataclass(frozen=True)
class NormHandoff:
    """A norm's input as the producer leaves it for the consumer: ``scaled`` ``[1, H]`` (``s *
    w`` in the activations' dtype), ``summed`` ``[1, H]`` (``s``, the new residual stream),
    ``partials`` float32 ``[P]`` (sums of squares of ``s`` by row block, added in index order) and
    the norm's ``eps``."""

    scaled: torch.Tensor
    summed: torch.Tensor
    partials: torch.Tensor
    eps: float

    @property
    def shape(self) -> torch.Size:
        return self.scaled.shape

    def rstd(self) -> torch.Tensor:
        """float32 ``1 / sqrt(mean(s^2) + eps)`` (a one-element tensor) from the partials."""
        total = self.partials.sum(dtype=torch.float32)
        return torch.rsqrt(total / self.summed.shape[-1] + self.eps)


def add_norm_handoff(
    y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> NormHandoff:
    """The producer's epilogue on its product ``y`` ``[1, H]`` (already in the activations' dtype):
    ``s = y + residual`` rounded to the dtype, ``s * weight`` rounded, one partial sum of squares."""
    summed = y + residual
    sf = summed.float()
    scaled = (sf * weight.float()).to(summed.dtype)
    return NormHandoff(scaled, summed, (sf * sf).sum().reshape(1), eps)


def scale_normed(
    y: torch.Tensor, h: NormHandoff, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The consumer's epilogue on its float32 sums ``y`` over ``h.scaled``: ``y * rstd + bias`` in
    ``dtype``."""
    out = y.float() * h.rstd()
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def wna16_add_norm_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          offsets: torch.Tensor | None, bits: int, group_size: int,
                          bias: torch.Tensor | None, residual: torch.Tensor, norm_weight: torch.Tensor,
                          eps: float) -> NormHandoff:
    """:func:`~kernels.quant_reference.wna16_linear` of one token ``x`` ``[1, K]`` as a norm's
    producer (:func:`add_norm_handoff`)."""
    y = quant_reference.wna16_linear(x, qweight, scales, offsets, bits, group_size, bias)
    return add_norm_handoff(y, residual, norm_weight, eps)


def wna16_normed_linear(h: NormHandoff, qweight: torch.Tensor, scales: torch.Tensor,
                        offsets: torch.Tensor | None, bits: int, group_size: int,
                        bias: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """:func:`~kernels.quant_reference.wna16_linear` of the normalised input ``h`` hands over
    (:func:`scale_normed`, sums in float32); ``gated``: the weight is ``[gate; up]`` and the
    result ``silu_and_mul`` of that product, each half rounded to the dtype first."""
    x = h.scaled
    w = quant_reference.dequantize_wna16(qweight, scales, offsets, bits, group_size).to(x.dtype)
    y = scale_normed(x.float() @ w.float().t(), h, bias, x.dtype)
    return reference.silu_and_mul(y) if gated else y
