"""Multi-LoRA products, one adapter per token: ``lora_shrink`` (``x @ A.T``) and ``lora_expand``
(``y += scale * xa @ B.T``, in place), Triton versions of :func:`kernels.reference.lora_shrink` and
:func:`kernels.reference.lora_expand`.

The adapters of a layer are stacked in slots: ``a`` ``[S, R, K]``, ``b`` ``[S, N, R]``, ``scales``
``[S]``, and each token names its slot in ``slots`` ``[T]``. The layout is per token (BGMV, as in
Punica and vLLM's ``bgmv`` kernels): one program per token (and per block of outputs) reads its
own adapter's rows. A decode batch mixes adapters token by token, so grouping tokens by adapter
would cost a sort per step; per-token programs need none, and the slots and scales are device
tensors read inside the kernels, so a step launches the same grid whatever its adapters are
(no host sync: the ops can be captured in a CUDA graph). A long prefill runs many tokens of one
adapter, where a segmented kernel (SGMV: a ``tl.dot`` tile over a run of tokens sharing an
adapter) would read each adapter's weights once per tile instead of once per token; that kernel
is future work.

Slot 0 is "no adapter": its ``a`` and ``b`` are zeros and ``scales[0] == 0``. The kernels exploit
it: a token of slot 0 gets a shrink row of zeros without loading anything, and a token whose
slot's scale is 0 leaves ``y`` untouched (no loads, no store), bit for bit what the reference
gives (it skips the same tokens). ``R`` is a layer's rank columns (a fused layer's sub-projections
together: q/k/v at rank 64 is 192): the kernels take it in power-of-two blocks of 16 to 64 with
masks; ``K`` and ``N`` need not be multiples of a block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MIN_BLOCK_R = 16  # tl.arange and the masks want a power of two; 16 keeps the tiles regular
_MAX_BLOCK_R = 64  # the expand kernel's rank block; larger ranks loop over blocks of it
# Inputs one shrink program sums; 0: all of K (one program per token and rank block, the variant
# measured on an H100). Split K (e.g. 512: 8 programs at K 4096) is checked under the interpreter
# and waits for a GPU run to be measured and made the default (docs/BENCHMARKS.md).
_K_SPLIT = 0
# Register tile of a program (elements of [BLOCK_R, BLOCK_K] or [BLOCK_N, BLOCK_R]): 64 float32
# values a thread on 4 warps.
_TILE = 8192
_NUM_WARPS = 4


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, out_ptr, R, K, K_SPLIT, stride_x, stride_o,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program (token, block of ranks, split of K): out[t, split, r] = the split's share of
    # sum_k x[t, k] a[slot, r, k] (float32); the wrapper sums the splits in a fixed order.
    t = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    r_ok = r < R
    out_row = out_ptr + (t * tl.num_programs(2) + split) * stride_o
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot == 0:  # no adapter: zero weights give zeros, so skip the loads
        tl.store(out_row + r, tl.zeros([BLOCK_R], dtype=tl.float32), mask=r_ok)
        return
    ks = tl.arange(0, BLOCK_K)
    x_row = x_ptr + t * stride_x
    a_rows = a_ptr + slot * R * K + r[:, None] * K
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    k_start = split * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = k0 + ks < k_end
        xv = tl.load(x_row + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
        av = tl.load(a_rows + k0 + ks[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc += av.to(tl.float32) * xv[None, :]
    tl.store(out_row + r, tl.sum(acc, axis=1), mask=r_ok)


@triton.jit
def _lora_expand_kernel(y_ptr, xa_ptr, b_ptr, slots_ptr, scales_ptr, R, N, stride_y, stride_xa,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program (token, block of outputs): y[t, n] += scale * sum_r xa[t, r] b[slot, n, r].
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    scale = tl.load(scales_ptr + slot)
    if scale == 0.0:  # no adapter (slot 0) or a disabled one: y stays as it is, bit for bit
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rs = tl.arange(0, BLOCK_R)
    b_rows = b_ptr + slot * N * R + n[:, None] * R
    acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = r0 + rs < R
        xa = tl.load(xa_ptr + t * stride_xa + r0 + rs, mask=r_ok, other=0.0)
        bv = tl.load(b_rows + r0 + rs[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc += bv.to(tl.float32) * xa[None, :]
    delta = tl.sum(acc, axis=1)
    y_ptrs = y_ptr + t * stride_y + n
    y = tl.load(y_ptrs, mask=n_ok, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + scale * delta).to(y_ptr.dtype.element_ty), mask=n_ok)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, *, out: torch.Tensor | None = None,
                block_r: int = _MIN_BLOCK_R, block_k: int | None = None,
                k_split: int = _K_SPLIT) -> torch.Tensor:
    """Triton :func:`kernels.reference.lora_shrink`: ``x`` ``[T, K]``, ``a`` ``[S, R, K]`` of
    ``x``'s dtype, ``slots`` ``[T]`` (int32/int64 in ``[0, S)``, not checked) -> float32 ``[T, R]``.
    ``out`` (optional, float32 ``[T, R]``) receives the result. Tiling: ``block_r`` ranks (a power
    of two >= 16) and ``block_k`` inputs per step (default: a ``[block_r, block_k]`` tile of 8k
    elements, at most ``K`` rounded up to a power of two); ``k_split`` > 0: each program sums
    that many inputs (rounded up to a multiple of ``block_k``), so a decode token's row is spread
    over ``K / k_split`` programs (one program walking all of K took 16 us at K 4096 on an H100),
    their partial sums added in split order (deterministic: no atomics); 0: one split."""
    t, k = _rows(x, "x")
    if a.dim() != 3 or a.shape[2] != k or a.dtype != x.dtype or not a.is_contiguous():
        raise ValueError(f"lora_shrink: a must be a contiguous [S, R, {k}] {x.dtype} tensor, "
                         f"got {tuple(a.shape)} {a.dtype}")
    _check_slots(slots, t, "lora_shrink")
    rank = a.shape[1]
    if out is None:
        out = torch.empty((t, rank), dtype=torch.float32, device=x.device)
    elif out.shape != (t, rank) or out.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError(f"lora_shrink: out must be float32 [{t}, {rank}] with unit column stride, "
                         f"got {tuple(out.shape)} {out.dtype}")
    if block_k is None:
        block_k = max(16, min(triton.next_power_of_2(k), _TILE // block_r))
    _check_block(block_r, "block_r")
    _check_block(block_k, "block_k")
    if t and rank:
        span = triton.cdiv(k_split, block_k) * block_k if k_split > 0 else triton.cdiv(k, block_k) * block_k
        splits = triton.cdiv(k, span)
        target = out if splits == 1 else torch.empty((t, splits, rank), dtype=torch.float32, device=x.device)
        grid = (t, triton.cdiv(rank, block_r), splits)
        _lora_shrink_kernel[grid](x, a, slots, target, rank, k, span, x.stride(0),
                                  out.stride(0) if splits == 1 else rank,
                                  BLOCK_R=block_r, BLOCK_K=block_k, num_warps=_NUM_WARPS)
        if splits > 1:
            torch.sum(target, dim=1, out=out)
    return out


def lora_expand(y: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                scales: torch.Tensor, *, block_n: int | None = None) -> torch.Tensor:
    """Triton :func:`kernels.reference.lora_expand`, in place on ``y`` ``[T, N]`` (returned):
    ``xa`` float32 ``[T, R]``, ``b`` ``[S, N, R]`` of ``y``'s dtype, ``slots``
    ``[T]`` (int32/int64 in ``[0, S)``, not checked), ``scales`` float32 ``[S]``. ``block_n``:
    outputs per program, a power of two >= 16 (default: an ``[block_n, R]`` tile of 8k elements,
    at most ``N`` rounded up to a power of two)."""
    t, n = _rows(y, "y")
    if xa.dim() != 2 or xa.shape[0] != t or xa.dtype != torch.float32 or xa.stride(-1) != 1:
        raise ValueError(f"lora_expand: xa must be float32 [{t}, R] with unit column stride, "
                         f"got {tuple(xa.shape)} {xa.dtype}")
    rank = xa.shape[1]
    if b.dim() != 3 or b.shape[1:] != (n, rank) or b.dtype != y.dtype or not b.is_contiguous():
        raise ValueError(f"lora_expand: b must be a contiguous [S, {n}, {rank}] {y.dtype} tensor, "
                         f"got {tuple(b.shape)} {b.dtype}")
    if scales.shape != (b.shape[0],) or scales.dtype != torch.float32 or not scales.is_contiguous():
        raise ValueError(f"lora_expand: scales must be float32 [{b.shape[0]}], got {tuple(scales.shape)} "
                         f"{scales.dtype}")
    _check_slots(slots, t, "lora_expand")
    block_r = min(_MAX_BLOCK_R, max(_MIN_BLOCK_R, triton.next_power_of_2(rank)))
    if block_n is None:
        block_n = max(16, min(triton.next_power_of_2(n), _TILE // block_r))
    _check_block(block_n, "block_n")
    if t and n and rank:
        grid = (t, triton.cdiv(n, block_n))
        _lora_expand_kernel[grid](y, xa, b, slots, scales, rank, n, y.stride(0), xa.stride(0),
                                  BLOCK_R=block_r, BLOCK_N=block_n, num_warps=_NUM_WARPS)
    return y


def _rows(x: torch.Tensor, name: str) -> tuple[int, int]:
    """``x``'s ``(rows, columns)``: a matrix whose columns are contiguous (rows may be strided)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be [T, *] with unit column stride, got {tuple(x.shape)} "
                         f"strides {x.stride()}")
    return x.shape[0], x.shape[1]


def _check_slots(slots: torch.Tensor, tokens: int, op: str) -> None:
    if slots.shape != (tokens,) or slots.dtype not in (torch.int32, torch.int64) or not slots.is_contiguous():
        raise ValueError(f"{op}: slots must be contiguous int32/int64 [{tokens}], got {tuple(slots.shape)} "
                         f"{slots.dtype}")


def _check_block(block: int, name: str) -> None:
    if block < 16 or block & (block - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {block}")
