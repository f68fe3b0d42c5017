"""The one-token GEMVs' epilogues that hand an RMSNorm over (:mod:`kernels.norm_handoff`: the
contract and the torch references).

``HANDOFF`` (a GEMV kernel's constexpr): 0 none; :data:`PRODUCER` the product is added to the
residual and the rows' share of the next norm is stored (:func:`handoff_store`); :data:`CONSUMER`
the input is ``s * w`` and the sums are scaled by ``rstd`` (:func:`handoff_rstd`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.norm_handoff import NormHandoff

PRODUCER = 1
CONSUMER = 2


@triton.jit
def handoff_store(y, rn, ok, res_ptr, nw_ptr, sum_ptr, z_ptr, ss_ptr):
    """The producer's epilogue for its rows ``rn`` (``ok``: those that exist) and their float32
    sums ``y`` (bias included): ``s = y + residual`` (``y`` rounded to the dtype first, as the
    unfused GEMV stores it; the sum rounded as torch's add) to ``sum_ptr``, ``s * w`` rounded to
    ``z_ptr``, and this program's sum of ``s^2`` (the rounded ``s``) to ``ss_ptr[program]``."""
    dt = sum_ptr.dtype.element_ty
    r = tl.load(res_ptr + rn, mask=ok, other=0.0).to(tl.float32)
    s = (y.to(dt).to(tl.float32) + r).to(dt)
    tl.store(sum_ptr + rn, s, mask=ok)
    sf = s.to(tl.float32)
    w = tl.load(nw_ptr + rn, mask=ok, other=0.0).to(tl.float32)
    tl.store(z_ptr + rn, (sf * w).to(dt), mask=ok)
    tl.store(ss_ptr + tl.program_id(0), tl.sum(tl.where(ok, sf * sf, 0.0), axis=0))


@triton.jit
def handoff_partials(ss_ptr, n_parts, PARTS: tl.constexpr):
    """The producer's partial sums of squares (``n_parts`` of them, ``PARTS`` >= it a power of
    two), read after the PDL wait: they are the kernel before's output."""
    i = tl.arange(0, PARTS)
    return tl.load(ss_ptr + i, mask=i < n_parts, other=0.0)


@triton.jit
def handoff_rstd(partials, K, eps):
    """``1 / sqrt(sum(partials) / K + eps)``, float32, the partials summed in one fixed order."""
    return 1.0 / tl.sqrt(tl.sum(partials, axis=0) / K + eps)


def producer_outputs(residual: torch.Tensor, programs: int, eps: float) -> NormHandoff:
    """Empty outputs of a producer GEMV with ``programs`` row blocks, ``residual`` ``[1, H]``."""
    return NormHandoff(torch.empty_like(residual), torch.empty_like(residual),
                       torch.empty(programs, dtype=torch.float32, device=residual.device), eps)


def handoff_args(handoff: NormHandoff | None = None, residual: torch.Tensor | None = None,
                 norm_weight: torch.Tensor | None = None, consumer: bool = False,
                 dummy: torch.Tensor | None = None) -> dict[str, object]:
    """A GEMV kernel's handoff arguments: a producer's (``handoff`` from :func:`producer_outputs`,
    with ``residual`` and ``norm_weight``), a consumer's (``handoff`` it reads, ``consumer``), or
    none (``dummy`` stands in for the pointers, never read)."""
    if handoff is None:
        assert dummy is not None
        return dict(res_ptr=dummy, nw_ptr=dummy, z_ptr=dummy, ss_ptr=dummy, n_parts=1, eps=0.0, HANDOFF=0,
                    PARTS=1)
    parts = handoff.partials.numel()
    common = dict(z_ptr=handoff.scaled, ss_ptr=handoff.partials, n_parts=parts, eps=handoff.eps,
                  PARTS=triton.next_power_of_2(parts))
    if consumer:
        return dict(res_ptr=handoff.scaled, nw_ptr=handoff.scaled, HANDOFF=CONSUMER, **common)
    assert residual is not None and norm_weight is not None
    return dict(res_ptr=residual, nw_ptr=norm_weight, HANDOFF=PRODUCER, **common)
