"""One-token GEMV over 4-bit words streamed by the Tensor Memory Accelerator (TMA) through a
multi-stage shared-memory pipeline.

Why: the one-token word kernel (:func:`kernels.triton_ops.gemv.gemv_wna16`) holds one tile of
words in registers per program and reads its next tile only after summing this one, so the bytes
an SM has in flight are (resident programs) x (one tile). On the H200 its four llama3-8b
projections reach about 68% of the copy rate, with 22-32% achieved occupancy and no eligible warp
in about half of the cycles (DECISIONS 139, 141): latency, not instruction issue, is what is left.
Loading a register tile one step ahead cost registers and so programs (``rotate``, DECISIONS 139),
and L2 prefetches competed with the loads they were meant to hide (DECISIONS 141). Here the
weights come through tensor descriptors (``TensorDescriptor`` made on the host, passed by value,
so a CUDA graph keeps it): inside ``tl.range(..., num_stages=STAGES)`` Triton's pipeliner issues
``STAGES - 1`` tiles ahead with ``cp.async.bulk.tensor`` into shared memory and waits on their
mbarriers, so each program keeps several tiles in flight without holding them in registers.

The arithmetic is the word kernel's own (:func:`kernels.triton_ops.gemv._words_tile`: the packed
bf16 decode and the inputs read in PTX where those apply), so the sums are the same as the word
kernel's at the same ``BLOCK_K`` (its tile: the unit of the group scales' products); only the
order of the final reduction over tiles can differ. Symmetric 4-bit weights, groups of 32 to
``BLOCK_K``, whole tiles (``N`` a multiple of the rows per program, ``K`` of ``BLOCK_K``), 16-byte
aligned rows: :func:`tma_applies`. ``gated``: the weight is ``[gate; up]`` (``N`` rows); a program
loads ``BLOCK_N / 2`` gate rows and the matching up rows in one three-dimensional box (the
weight seen as ``[2, N / 2, K / 8]``), so their inputs are read once, and stores
``silu(gate) * up``.

Not used by the engine until a card measures it (``wna16.M1_TMA_TILES``; ``bench_gemv.py --parts
w4_tma``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kernels.triton_ops.activation import silu_mul_tile
from kernels.triton_ops.gemv import _as_words, _words_tile
from kernels.triton_ops.norm_handoff import (
    PRODUCER,
    handoff_args,
    handoff_partials,
    handoff_rstd,
    handoff_store,
)
from kernels.triton_ops.pdl import pdl_begin, pdl_launch

try:  # Triton 3.4+: host-side descriptors (our minimum is 3.4; the import is guarded for tools)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None


@dataclass(frozen=True)
class TmaTiles:
    """Weight rows per program (gated: gate and up rows together), inputs per pipeline stage
    (a multiple of the group size, at most 2,048: a TMA box is at most 256 words wide), stages
    in flight (``stages - 1`` tiles read ahead) and warps."""

    block_n: int = 16
    block_k: int = 512
    stages: int = 4
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if not 64 <= self.block_k <= 2048:
            raise ValueError(f"block_k must be 64..2048 inputs (a TMA box of 8..256 words), "
                             f"got {self.block_k}")
        if self.stages < 1:
            raise ValueError(f"stages must be at least 1, got {self.stages}")

    def rows(self, gated: bool) -> int:
        """Weight rows per descriptor box: ``block_n``, or gated ``block_n / 2`` of each half."""
        return self.block_n // 2 if gated else self.block_n


def tma_applies(x: torch.Tensor, qweight: torch.Tensor, offsets: torch.Tensor | None, bits: int,
                group_size: int, tiles: TmaTiles, gated: bool = False) -> bool:
    """Whether :func:`gemv_int4_tma` takes this product: one contiguous token (bf16 or float16 on
    CUDA, float32 too on the CPU interpreter), symmetric 4-bit weights readable as int32 words
    with 16-byte aligned rows, groups dividing the tile, whole tiles; on CUDA a Hopper-class card
    (TMA, sm_90+)."""
    if TensorDescriptor is None or bits != 4 or offsets is not None or x.dim() != 2 or x.shape[0] != 1 \
            or x.stride(1) != 1:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    q = _as_words(qweight)
    n, k = qweight.shape[0], x.shape[1]
    rows = tiles.rows(gated)
    if q is None or q.shape[1] * 8 != k or rows < 1 or (n // 2 if gated else n) % rows:
        return False
    if k % tiles.block_k or tiles.block_k % group_size or (q.stride(0) * 4) % 16 or q.data_ptr() % 16:
        return False
    if x.is_cuda:
        return x.dtype != torch.float32 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return True


@triton.jit
def _gemv_int4_tma_kernel(q_desc, x_ptr, s_ptr, bias_ptr, out_ptr, N, K, stride_sn,
                          res_ptr, nw_ptr, z_ptr, ss_ptr, n_parts, eps,
                          GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, STAGES: tl.constexpr, GATED: tl.constexpr,
                          ASM: tl.constexpr, PAIRS: tl.constexpr, XLOAD: tl.constexpr,
                          PDL: tl.constexpr = False, HANDOFF: tl.constexpr = 0, PARTS: tl.constexpr = 1):
    # q_desc: the [N, K / 8] int32 words, boxes of [BLOCK_N, BLOCK_K / 8]; gated, the same words
    # as [2, N / 2, K / 8] (gate half, up half), boxes of [2, BLOCK_N / 2, BLOCK_K / 8]: program p
    # owns outputs p * ROWS .. + ROWS and one load brings their gate rows then their up rows.
    # Every tile is whole (tma_applies), so no masks. HANDOFF as the word kernel's
    # (kernels.triton_ops.norm_handoff): 1 producer (not gated), 2 consumer.
    WORDS: tl.constexpr = BLOCK_K // 8
    TILE_G: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
    WPG: tl.constexpr = WORDS // TILE_G
    ROWS: tl.constexpr = BLOCK_N // 2 if GATED else BLOCK_N
    r0 = tl.program_id(0) * ROWS
    r = tl.arange(0, BLOCK_N)
    rn = (r // ROWS) * (N // 2) + r0 + r % ROWS if GATED else r0 + r  # the tile's weight rows
    ok = rn < N
    s_rows = s_ptr + rn.to(tl.int64)[:, None] * stride_sn
    acc = tl.zeros([BLOCK_N, TILE_G, WPG], dtype=tl.float32)
    token = 0
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        jj = k0 // 8 + tl.arange(0, WORDS)
        if GATED:
            w = tl.reshape(q_desc.load([0, r0, k0 // 8]), [BLOCK_N, WORDS])
        else:
            w = q_desc.load([r0, k0 // 8])
        # The PDL wait inside the first iteration: the pipeline's prologue (its first STAGES - 1
        # tiles, weights only) is asked for before it, the inputs (``token``) after it.
        if k0 == 0:
            token = pdl_begin(PDL)
        acc = _words_tile(acc, w, jj, k0, K, K // 8, x_ptr, token, s_rows, s_rows, ok, GROUP, 8.0, False,
                          BLOCK_N, BLOCK_K, True, ASM, PAIRS, XLOAD)
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HANDOFF == 2:  # the partials are the kernel before's output: read after the wait (above)
        y = y * handoff_rstd(handoff_partials(ss_ptr, n_parts, PARTS), K, eps)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    if HANDOFF == 1:
        handoff_store(y, rn, ok, res_ptr, nw_ptr, out_ptr, z_ptr, ss_ptr)
    elif GATED:
        # Rounded to the output dtype first, as the unfused GEMV's stores then silu_and_mul.
        gate, up = tl.split(tl.permute(tl.reshape(y.to(dt), [2, ROWS]), [1, 0]))
        tl.store(out_ptr + r0 + tl.arange(0, ROWS), silu_mul_tile(gate, up).to(dt))
    else:
        tl.store(out_ptr + rn, y.to(dt))


def gemv_int4_tma(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                  bias: torch.Tensor | None = None, *, tiles: TmaTiles | None = None, gated: bool = False,
                  pairs: bool = True, xload: bool = True, pdl: bool = False,
                  handoff: dict[str, Any] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(qweight).T + bias`` for one token ``x`` ``[1, K]`` and symmetric 4-bit
    ``qweight`` (:class:`kernels.quant_reference.WnA16Weight` layout, ``[N, K / 2]`` bytes) with
    ``scales`` ``[N, K / group_size]``; ``gated``: ``silu_and_mul`` of it, ``[1, N / 2]``.
    ``pairs`` / ``xload``: the word kernel's packed 16-bit decode and PTX input loads (CUDA, 16-bit
    ``x``). ``handoff`` / ``out``: as :func:`kernels.triton_ops.gemv.gemv_wna16`'s (a producer is
    not ``gated``). Refuses what :func:`tma_applies` refuses."""
    tiles = tiles or TmaTiles()
    if not tma_applies(x, qweight, None, 4, group_size, tiles, gated):
        raise ValueError(f"gemv_int4_tma does not apply: x {tuple(x.shape)} {x.dtype}, qweight "
                         f"{tuple(qweight.shape)}, group {group_size}, {tiles}, gated={gated}")
    q = _as_words(qweight)
    assert q is not None and TensorDescriptor is not None  # tma_applies
    n, k = qweight.shape[0], x.shape[1]
    rows = tiles.rows(gated)
    if gated:  # gate and up rows of one program in one box
        desc = TensorDescriptor.from_tensor(q.view(2, n // 2, q.shape[1]), [2, rows, tiles.block_k // 8])
    else:
        desc = TensorDescriptor.from_tensor(q, [rows, tiles.block_k // 8])
    if handoff is not None and gated and handoff["HANDOFF"] == PRODUCER:
        raise ValueError("a norm handoff's producer is not gated")
    if out is None:
        out = torch.empty((1, n // 2 if gated else n), dtype=x.dtype, device=x.device)
    sixteen = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    _gemv_int4_tma_kernel[(out.shape[1] // rows,)](
        desc, x, scales, bias if bias is not None else scales, out, n, k, scales.stride(0),
        **(handoff or handoff_args(dummy=out)),
        GROUP=group_size, HAS_BIAS=bias is not None, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        STAGES=tiles.stages, GATED=gated, ASM=x.is_cuda, PAIRS=pairs and sixteen,
        XLOAD=xload and sixteen and x.data_ptr() % 16 == 0,
        num_warps=tiles.num_warps, num_stages=tiles.stages, **pdl_launch(pdl))
    return out
