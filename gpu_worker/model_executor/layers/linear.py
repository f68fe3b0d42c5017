"""The CPU's weight layout for the projections: ``[in, out]`` (transposed) instead of ``[out, in]``.

Why: a decode step of a small model is one pass over all the weights, and on the CPU the
matrix product of one or two rows streams a weight stored ``[in, out]`` (``x @ W_t``, rows of
``W_t`` scaled and summed) much faster than ``F.linear`` over ``[out, in]`` (one dot product
per output): on the 2-core EPYC, SmolLM2-135M's layer projections take 29 vs 37 ms at one row
and 40 vs 62 ms at two, the 49152 x 576 LM head 5.4 vs 9.7 ms. From about four rows the
standard layout is 5-10% faster; batch-1 latency is what this layout is for.

The linear layers' unquantized method (``layers/quantization/base.py``) stores this layout on
the CPU after loading and multiplies with :func:`transposed_linear`; the models themselves never
know which layout they run.
"""

from __future__ import annotations

import torch


def transposed_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight_t (+ bias)`` with ``weight_t`` ``[in, out]`` contiguous (inference only)."""
    if bias is None:
        return torch.matmul(x, weight_t)
    if x.dim() == 2:
        return torch.addmm(bias, x, weight_t)
    return torch.matmul(x, weight_t) + bias
