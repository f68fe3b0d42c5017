"""One-token 4-bit GEMV whose weight tiles land in shared memory by ``cp.async``, each thread
reading back only the bytes it copied (Gluon; CUDA sm_80+; experimental, not on the engine's path).

Why: the word GEMV (:func:`kernels.triton_ops.gemv.gemv_wna16`) holds each tile of words in
registers and asks for the next only after summing it, so an SM has (resident programs) x (one
tile) in flight, and on the H200 the 4-bit projections run at the H100's speed (latency, not
bandwidth; DECISIONS 139, 141, 150). Here a ring of ``STAGES`` tiles in shared memory keeps
``STAGES - 1`` tiles in flight per program without registers, and every tile of the prologue is
asked for before the PDL wait (weights only). The TMA pipeline tried before (DECISIONS 150) lost
to its per-tile barriers and mbarrier protocol; here a tile's layout in shared memory is the
layout its thread reads it in, so a thread's ``cp.async.wait_group`` orders its own copies
before its own reads and the ring needs no barrier at all (see :func:`_tile_layout`).

Arithmetic per word is the word kernel's packed bf16 decode (:func:`kernels.triton_ops.gemv._pairs_ptx`)
on the same pairs of inputs (:func:`kernels.triton_ops.gemv._pair_loads_ptx`), so the sums match
the word kernel's up to the order of the float32 additions across words.

Scope: symmetric 4-bit int32 words (``[N, K / 8]``), groups of 128 (16 words), bf16 inputs and
scales, one token, whole tiles (``BLOCK_N`` divides ``N`` (gated: ``N / 2``), ``BLOCK_K``
divides ``K``); ``gated``: the ``[gate; up]`` weight with SiLU-and-mul in the epilogue.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from kernels.triton_ops.gemv import _PAIR_LOADS_PTX, _PAIRS_PTX

GROUP = 128
WPG = GROUP // 8  # words per group


@gluon.constexpr_function
def _tile_layout(rows: int, tile_g: int, num_warps: int, vec: int) -> gl.BlockedLayout:
    """``[rows, groups, words of a group]``: ``vec`` consecutive words (one ``cp.async`` and one
    ``ld.shared``) of as many rows as the warps allow per thread, so the inputs of a word column
    are loaded once for all of the thread's rows; ``16 / vec`` threads per group, the rest of the
    warp over groups, warps over groups and then rows. Copied into and read from an unswizzled
    ``[rows, groups, words]`` buffer in this layout, each thread reads back only what it copied."""
    tw = 16 // vec
    tg = 32 // tw
    wg = max(1, min(num_warps, tile_g // tg))
    wr = num_warps // wg
    if tile_g % (tg * wg) or rows % wr:
        raise ValueError(f"no layout: {rows} rows, {tile_g} groups, {num_warps} warps, {vec} words per copy")
    return gl.BlockedLayout([rows // wr, 1, vec], [1, tg, tw], [wr, wg, 1], [2, 1, 0])


@gluon.jit
def _pdl_begin(PDL: gl.constexpr):
    """:func:`kernels.triton_ops.pdl.pdl_begin` (``PDL == 2``: trigger, then wait; 1: the other order)."""
    token = 0
    if PDL == 2:
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
        token = gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32,
                                          is_pure=False, pack=1)
    elif PDL:
        token = gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32,
                                          is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
    return token


@gluon.jit
def _word_ptrs(q_ptr, rows, stride_qn, TILE_G: gl.constexpr, L: gl.constexpr):
    """``[rows, TILE_G, WPG]`` pointers to the words of the first tile of ``rows``."""
    r = gl.convert_layout(rows, gl.SliceLayout(1, gl.SliceLayout(2, L)))
    g = gl.arange(0, TILE_G, layout=gl.SliceLayout(1, gl.SliceLayout(0, L)))
    w = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(0, L)))
    base = q_ptr + r.to(gl.int64) * stride_qn
    off = g[:, None] * 16 + w[None, :]
    return base[:, None, None] + off[None, :, :]


@gluon.jit
def _tile_sums(acc, w, x_ptr, s_ptr, rows, stride_sn, k0, token, TILE_G: gl.constexpr, L: gl.constexpr):
    """``acc`` plus one tile of words ``w`` (inputs from ``k0``) times their inputs and scales."""
    g = gl.arange(0, TILE_G, layout=gl.SliceLayout(1, gl.SliceLayout(0, L)))
    j = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(0, L)))
    xw = x_ptr + k0 + (g[:, None] * 16 + j[None, :]) * 8
    p0, p1, p2, p3 = gl.inline_asm_elementwise(_PAIR_LOADS_PTX, "=r,=r,=r,=r,l,r", [xw, token],
                                               dtype=(gl.int32,) * 4, is_pure=True, pack=1)
    t = gl.inline_asm_elementwise(_PAIRS_PTX, "=f,r,r,r,r,r",
                                  [w, p0[None, :, :], p1[None, :, :], p2[None, :, :], p3[None, :, :]],
                                  dtype=gl.float32, is_pure=True, pack=1)
    r = gl.convert_layout(rows, gl.SliceLayout(1, gl.SliceLayout(2, L)))
    gs = gl.arange(0, TILE_G, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))
    s = gl.load(s_ptr + r.to(gl.int64)[:, None] * stride_sn + (k0 // 128 + gs)[None, :]).to(gl.float32)
    return acc + t * s[:, :, None]


@gluon.jit
def _issue(smem, ptrs, t, k_lo, n_t, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """Ask for tile ``t`` (if it exists) into its ring slot, then close the copy group (empty
    groups keep every thread's group count in step with the tile index)."""
    if t < n_t:
        async_copy.async_copy_global_to_shared(smem.index(t % STAGES), ptrs + (k_lo + t * BLOCK_K) // 8,
                                               eviction_policy="evict_first")


@gluon.jit
def _w4_async_kernel(x_ptr, q_ptr, s_ptr, out_ptr, N, K, stride_qn, stride_sn,
                     BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                     GATED: gl.constexpr, PDL: gl.constexpr, VEC: gl.constexpr):
    # GATED: the weight is [gate; up] (N rows); the program owns outputs pid * BLOCK_N / 2 + i and
    # reads gate rows o and up rows o + N / 2 as two tiles of BLOCK_N / 2 rows (two rings).
    TILE_G: gl.constexpr = BLOCK_K // 128
    R: gl.constexpr = BLOCK_N // 2 if GATED else BLOCK_N
    L: gl.constexpr = _tile_layout(R, TILE_G, gl.num_warps(), VEC)
    SH: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    RL: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, L))
    rows = gl.program_id(0) * R + gl.arange(0, R, layout=RL)
    n_t = K // BLOCK_K
    k_lo = 0
    smem_a = gl.allocate_shared_memory(gl.int32, [STAGES, R, TILE_G, 16], SH)
    ptrs_a = _word_ptrs(q_ptr, rows, stride_qn, TILE_G, L)
    if GATED:
        smem_b = gl.allocate_shared_memory(gl.int32, [STAGES, R, TILE_G, 16], SH)
        ptrs_b = _word_ptrs(q_ptr, rows + N // 2, stride_qn, TILE_G, L)
    for t in gl.static_range(STAGES - 1):  # weights only: asked for before the PDL wait
        _issue(smem_a, ptrs_a, t, k_lo, n_t, BLOCK_K, STAGES)
        if GATED:
            _issue(smem_b, ptrs_b, t, k_lo, n_t, BLOCK_K, STAGES)
        async_copy.commit_group()
    token = _pdl_begin(PDL)
    acc_a = gl.zeros([R, TILE_G, 16], gl.float32, L)
    acc_b = gl.zeros([R, TILE_G, 16], gl.float32, L)
    for i in range(n_t):
        _issue(smem_a, ptrs_a, i + STAGES - 1, k_lo, n_t, BLOCK_K, STAGES)
        if GATED:
            _issue(smem_b, ptrs_b, i + STAGES - 1, k_lo, n_t, BLOCK_K, STAGES)
        async_copy.commit_group()
        async_copy.wait_group(STAGES - 1)  # this thread's copies of tile i have landed
        k0 = k_lo + i * BLOCK_K
        acc_a = _tile_sums(acc_a, smem_a.index(i % STAGES).load(L), x_ptr, s_ptr, rows, stride_sn, k0, token,
                           TILE_G, L)
        if GATED:
            acc_b = _tile_sums(acc_b, smem_b.index(i % STAGES).load(L), x_ptr, s_ptr, rows + N // 2, stride_sn,
                               k0, token, TILE_G, L)
    ya = gl.sum(gl.sum(acc_a, axis=2), axis=1).to(out_ptr.dtype.element_ty)
    if GATED:
        gate = ya.to(gl.float32)
        up = gl.sum(gl.sum(acc_b, axis=2), axis=1).to(out_ptr.dtype.element_ty).to(gl.float32)
        act = (gate / (1.0 + gl.exp(-gate))).to(out_ptr.dtype.element_ty).to(gl.float32)
        gl.store(out_ptr + rows, (act * up).to(out_ptr.dtype.element_ty))
    else:
        gl.store(out_ptr + rows, ya)


def gemv_w4_async(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *, gated: bool = False,
                  block_n: int = 8, block_k: int = 2048, stages: int = 3, num_warps: int = 4,
                  vec: int = 2, pdl: bool = False) -> torch.Tensor:
    """``x`` ``[1, K]`` (bf16) times symmetric 4-bit words ``qweight`` ``[N, K / 8]`` (int32, or
    ``[N, K / 2]`` uint8) with 16-bit ``scales`` ``[N, K / 128]``: ``[1, N]`` (gated: ``[1, N / 2]``,
    SiLU-and-mul applied)."""
    from kernels.triton_ops.pdl import pdl_launch

    words = qweight.view(torch.int32) if qweight.dtype == torch.uint8 else qweight
    n, k = words.shape[0], words.shape[1] * 8
    rows = n // 2 if gated else n
    r = block_n // 2 if gated else block_n
    if rows % r or k % block_k or block_k % 128 or x.dtype != torch.bfloat16:
        raise ValueError(f"gemv_w4_async: unsupported shape or dtype (N {n}, K {k}, tiles {block_n} x {block_k})")
    out = torch.empty(1, rows, device=x.device, dtype=x.dtype)
    launch = pdl_launch(pdl)
    _w4_async_kernel[(rows // r,)](x, words, scales, out, n, k, words.stride(0), scales.stride(0),
                                   BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, GATED=gated,
                                   PDL=launch.get("PDL", 0), VEC=vec, num_warps=num_warps,
                                   **({"launch_pdl": True} if pdl else {}))
    return out
