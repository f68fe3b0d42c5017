"""One-token 4/8-bit linears that hand an RMSNorm over (:mod:`kernels.norm_handoff`): the
Triton forms of :func:`kernels.norm_handoff.wna16_add_norm_linear` and
:func:`kernels.norm_handoff.wna16_normed_linear`.

Where the one-token GEMV is the word or TMA kernel with one split (:func:`~kernels.triton_ops.
wna16.m1_programs`; symmetric or asymmetric 4-bit words) the handoff is that launch's epilogue;
elsewhere (8-bit weights, a split tiling) the GEMV runs as it is and torch does the epilogue's
arithmetic (correct, not faster).
"""

from __future__ import annotations

import torch

from kernels.norm_handoff import NormHandoff, add_norm_handoff, scale_normed
from kernels.triton_ops.activation import silu_and_mul
from kernels.triton_ops.norm_handoff import handoff_args, producer_outputs
from kernels.triton_ops.wna16 import _check, m1_programs, one_token_gemv


def _one_token(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] != 1:
        raise ValueError(f"a norm handoff takes one token, got {x2.shape[0]}")
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def wna16_add_norm_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          offsets: torch.Tensor | None, bits: int, group_size: int,
                          bias: torch.Tensor | None, residual: torch.Tensor, norm_weight: torch.Tensor,
                          eps: float, *, pdl: bool = False) -> NormHandoff:
    """The producer: ``x`` ``[1, K]`` times the ``[N, K]`` weight, added to ``residual`` ``[1, N]``,
    handed to the next norm (weight ``norm_weight`` ``[N]``, ``eps``)."""
    x2 = _one_token(x)
    _check(x2, qweight, scales, offsets, bits, group_size)
    res = residual.reshape(1, -1).contiguous()
    programs = m1_programs(x2, qweight, offsets, bits, group_size)
    if programs is None:
        y = one_token_gemv(x2, qweight, scales, offsets, bits, group_size, bias, pdl=pdl)
        return add_norm_handoff(y, res, norm_weight, eps)
    h = producer_outputs(res, programs, eps)
    one_token_gemv(x2, qweight, scales, offsets, bits, group_size, bias, pdl=pdl,
                   handoff=handoff_args(h, res, norm_weight.contiguous()), out=h.summed)
    return h


def wna16_normed_linear(h: NormHandoff, qweight: torch.Tensor, scales: torch.Tensor,
                        offsets: torch.Tensor | None, bits: int, group_size: int,
                        bias: torch.Tensor | None = None, gated: bool = False, *,
                        pdl: bool = False) -> torch.Tensor:
    """The consumer: the normalised input ``h`` hands over times the ``[N, K]`` weight (``gated``:
    a ``[gate; up]`` weight, ``silu_and_mul`` of the product, ``[1, N / 2]``)."""
    x2 = _one_token(h.scaled)
    _check(x2, qweight, scales, offsets, bits, group_size)
    if m1_programs(x2, qweight, offsets, bits, group_size, gated) is None:
        y = one_token_gemv(x2, qweight, scales, offsets, bits, group_size, None, pdl=pdl)
        y = scale_normed(y, h, bias, x2.dtype)
        return silu_and_mul(y) if gated else y
    return one_token_gemv(x2, qweight, scales, offsets, bits, group_size, bias, pdl=pdl, gated=gated,
                          handoff=handoff_args(h, consumer=True))
