"""Programmatic dependent launch (PDL, sm_90+): a kernel launched with it may start while the
kernel before it in the stream is still running, and waits for that kernel's writes only where
it calls :func:`pdl_begin`.

At one token a decoder layer is a chain of short kernels (norm, GEMVs, attention), each bound by
the latency of its first reads as much as by bandwidth; with PDL the next kernel's programs are
resident and have their weight loads in flight when the previous kernel's last program ends.

Contract of a kernel that takes ``PDL``: every program calls :func:`pdl_begin` exactly once,
before its first store and before it reads anything a kernel of the step may write (activations,
the KV cache, partial sums); before it, a program may read only what no kernel writes: weights,
norm weights and other constant tables, and what the host writes before the step's kernels
(positions, slots, sequence lengths, block tables), past L1 (``.cg``) where the host rewrites it
between steps. :func:`pdl_begin` first lets the next kernel launch, then waits (``TRIGGER_FIRST``,
the default): kernel N + 1 may start as soon as every program of kernel N has started, so while
kernels N - 1, N - 2, ... still run, and its early reads must not depend on any of them. The
wait itself waits until kernel N is complete and its writes are visible, and kernel N completes
only after kernel N - 1 has (it waited too), so the order of the stream holds transitively, and
a kernel launched without PDL (a torch op, a copy) lets the next one launch only when it ends.
Kernels that read before the wait: the GEMVs (their first weight tile), the norms (their
weight), ``gather_columns`` (its index), ``rotary_store_kvcache`` (positions, slots, cos/sin;
``early_inputs``) and the decode attention (sequence lengths; block tables for its L2
prefetch's addresses, a hint that reads nothing into the SM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def pdl_supported(device: torch.device | str) -> bool:
    """Whether kernels on ``device`` can be launched with PDL (CUDA, compute capability 9+)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


# Where pdl_begin lets the next kernel launch: before its wait (TRIGGER_FIRST, PDL == 2) or after
# it (PDL == 1). Read when a kernel is launched (pdl_launch), so it may be flipped between
# launches (each value compiles its own kernels). Before: on an H100, W2 llama3-8b W4A16 462.3 /
# 462.2 -> 469.1 / 468.9 tok/s in two calls of opposite order, bf16 +0.2%, W1 / W3 within their
# run-to-run spread (DECISIONS 153).
TRIGGER_FIRST = True


def pdl_launch(pdl: bool) -> dict[str, int | bool]:
    """Launch keywords of a kernel taking ``PDL``: the constexpr (2: ``TRIGGER_FIRST``, else 1)
    and Triton's launch flag."""
    return {"PDL": 2 if TRIGGER_FIRST else 1, "launch_pdl": True} if pdl else {}


@triton.jit
def pdl_begin(PDL: tl.constexpr):
    """With ``PDL``: let the kernel after this one launch (``PDL == 2``, ``TRIGGER_FIRST``; its
    programs wait in turn), then wait until the kernel before this one is complete and its
    writes are visible; ``PDL == 1``: the same two in the other order (the module docstring says
    what each allows before the wait).

    The two ``griddepcontrol`` instructions are emitted here rather than through
    ``tl.extra.cuda.gdc_wait`` / ``gdc_launch_dependents``: Triton 3.4 (our minimum) ships those
    with the older ``_builder`` calling convention, and its own compiler then fails on any kernel
    that calls them (``unexpected keyword argument '_semantic'``; 3.5-3.9 are fine). The
    instructions are the same.

    Returns a token, an int32 the wait's assembly defines (0 without ``PDL``): a pure inline
    assembly that reads memory an earlier kernel writes takes it as an operand, so that the
    compiler cannot move it above the wait (a pure assembly is otherwise free to move)."""
    token = 0
    if PDL == 2:
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)
        token = tl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=tl.int32,
                                          is_pure=False, pack=1)
    elif PDL:
        token = tl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=tl.int32,
                                          is_pure=False, pack=1)
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)
    return token
