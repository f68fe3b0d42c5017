"""Column gather: ``x.index_select(-1, index)`` as a Triton kernel that takes part in the decode
step's programmatic-dependent-launch chain (:mod:`kernels.triton_ops.pdl`).

An act-order GPTQ layer reorders its input before its GEMV (``wna16.Segment.perm``). Torch's
``index_select`` is launched without PDL, so the 4-bit GEMV after it could no longer overlap
its start with the kernel before: on an H100 each reordered llama3-8b layer cost 4.9-6.6 us
more per token (``bench_gemv.py --parts w4_act``). This kernel reads its index (a constant of
the layer, like a weight) before the wait, then the activation, and writes the reordered copy.
The same values as ``index_select``: a copy, no arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_ops.pdl import pdl_begin, pdl_launch

_BLOCK = 1024


@triton.jit
def _gather_columns_kernel(x_ptr, idx_ptr, out_ptr, N, stride_x, stride_o, BLOCK: tl.constexpr,
                           PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    idx = tl.load(idx_ptr + cols, mask=ok, other=0)  # the layer's constant order: before the wait
    pdl_begin(PDL)
    v = tl.load(x_ptr + row * stride_x + idx, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, v, mask=ok)


def gather_columns(x: torch.Tensor, index: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """``x.index_select(-1, index)`` for ``x`` ``[..., K]`` and an integer ``index`` ``[N]`` whose
    values are in ``[0, K)`` (not checked: a layer's own permutation): ``[..., N]``."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n = index.shape[0]
    out = torch.empty((rows.shape[0], n), dtype=x.dtype, device=x.device)
    if rows.shape[0] and n:
        _gather_columns_kernel[(rows.shape[0], triton.cdiv(n, _BLOCK))](
            rows, index, out, n, rows.stride(0), out.stride(0), BLOCK=_BLOCK, num_warps=4, **pdl_launch(pdl),
        )
    return out.reshape(*x.shape[:-1], n)
