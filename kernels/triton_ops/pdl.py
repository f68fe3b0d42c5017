"""Programmatic dependent launch (PDL, sm_90+): a kernel launched with it may start while the
kernel before it in the stream is still running, and waits for that kernel's writes only where
it calls :func:`pdl_begin`.

At one token a decoder layer is a chain of short kernels (norm, GEMVs, attention), each bound by
the latency of its first reads as much as by bandwidth; with PDL the next kernel's programs are
resident and have their weight loads in flight when the previous kernel's last program ends.

Contract of a kernel that takes ``PDL``: every program calls :func:`pdl_begin` exactly once,
before its first store and before it reads anything the kernel launched just before it may
write (activations, the KV cache); before it, a program may read weights and norm weights, and
what only the host or a kernel two or more launches back writes, past L1 (``.cg``). That last
rule rests on the order :func:`pdl_begin` keeps: each program waits, then lets the next kernel
launch, so kernel N + 1 starts only once every program of kernel N has passed its wait, that
is once kernel N - 1 is complete and its writes are visible (a kernel without PDL, e.g. a torch
op, lets the next one launch only when it ends). Kernels that read before the wait:
``rotary_store_kvcache`` (positions, slots, cos/sin; ``early_inputs``) and the decode
attention with its L2 prefetch (sequence lengths; block tables for the prefetch's addresses).
A kernel that waits is complete only after the kernel before it is complete, so the order of
the stream holds transitively.
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


def pdl_launch(pdl: bool) -> dict[str, bool]:
    """Launch keywords of a kernel taking ``PDL``: the constexpr and Triton's launch flag."""
    return {"PDL": True, "launch_pdl": True} if pdl else {}


@triton.jit
def pdl_begin(PDL: tl.constexpr):
    """With ``PDL``: wait until the kernel before this one is complete and its writes are
    visible, then let the kernel after this one launch (its programs wait in turn).

    The two ``griddepcontrol`` instructions are emitted here rather than through
    ``tl.extra.cuda.gdc_wait`` / ``gdc_launch_dependents``: Triton 3.4 (our minimum) ships those
    with the older ``_builder`` calling convention, and its own compiler then fails on any kernel
    that calls them (``unexpected keyword argument '_semantic'``; 3.5-3.9 are fine). The
    instructions are the same.

    Returns a token, an int32 the wait's assembly defines (0 without ``PDL``): a pure inline
    assembly that reads memory an earlier kernel writes takes it as an operand, so that the
    compiler cannot move it above the wait (a pure assembly is otherwise free to move)."""
    token = 0
    if PDL:
        token = tl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=tl.int32,
                                          is_pure=False, pack=1)
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)
    return token
