"""Split-KV decode attention (flash-decoding) over the paged cache.

Phase 1: one program per (sequence, ``H`` adjacent KV heads, partition of the context). Its
rows are the ``H * G`` query heads (``G = Hq // Hk``) that share those KV heads (padded to 16
for the matrix unit), so each K/V tile is read from memory once for the whole group. With
``H > 1`` (``heads_per_program``; by default as many heads as make 128 dims, so 2 at head dim
64) the program's K/V rows are ``H * D`` contiguous elements of the cache instead of ``D``, and
its query tile is block-diagonal (row ``r`` holds its head's query in the columns of its own KV
head, zeros elsewhere): the scores of a row see its own head's keys only, and each row keeps
only its own head's columns of the output. The extra products are exact zeros. It writes the partition's
normalised output and its softmax statistics (running max in log2 units, sum of weights).
Phase 2: one program per (sequence, query head) merges the partitions. With a single
partition, phase 1 writes the final output and phase 2 is not launched; a sequence that fits
in its first partition (a short one in a batch, or any under CUDA graphs, whose grid is sized
for ``max_model_len``) is also written directly by phase 1 and skipped by phase 2, so a
batch-1 decode with a short context does no reduction work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_ops import attention_common as common
from kernels.triton_ops.pdl import pdl_begin, pdl_launch

# Below this many (sequence, KV head) programs the context is split to fill the GPU (about
# four per multiprocessor of an H100/H200; on an H200, batch 64 x 8 KV heads at 2k tokens ran
# fastest unsplit, 92% of copy bandwidth, against 79% split in two).
_TARGET_PROGRAMS = 512
# The shortest partition _choose_tiles picks (a multiple of the default block_n). Only launches
# of fewer than _TARGET_PROGRAMS groups split, so it shapes small batches: W2 (batch 1, 640
# tokens under the graphs' 2,048-token bound) runs 10 live partitions of 64 tokens instead of 3 of
# 256: W4A16 TPOT 2.228 / 2.225 -> 2.192 / 2.190 ms on an H100 (DECISIONS 148).
_MIN_PARTITION = 64
# With PDL (CUDA), whether a phase-1 program asks L2 for its first tile of keys and values before
# the PDL wait, by default (``DecodeConfig.prefetch`` None): :func:`_prefetch_first_tile`. With
# rotary's early inputs, on an H100: W2 llama3-8b W4A16 457.3 / 457.7 -> 462.1 / 463.3 tok/s, 32
# layers of rotary + attention 9.2 -> 7.8 us each (DECISIONS 152).
_PREFETCH = True


@dataclass(frozen=True)
class DecodeConfig:
    """Tiling of :func:`paged_decode_attention` (``None``: chosen from the shapes)."""

    partition_size: int | None = None  # context tokens per phase-1 program; multiple of block_n
    block_n: int | None = None  # keys per inner step
    num_warps: int = 2
    num_stages: int = 3
    # Adjacent KV heads per phase-1 program (a power of two dividing Hk; None: 128 // head_dim,
    # at least 1, so K/V rows of at least 256 bytes in 16-bit).
    heads_per_program: int | None = None
    # With PDL on CUDA: each phase-1 program asks L2 for its first BLOCK_N keys' K and V rows
    # before the PDL wait (:func:`_prefetch_first_tile`); None: ``_PREFETCH``. Without PDL, or
    # in the CPU interpreter (no PTX), nothing is prefetched.
    prefetch: bool | None = None

    def __post_init__(self) -> None:
        if self.block_n is not None and (self.block_n & (self.block_n - 1) or self.block_n < 16):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        hp = self.heads_per_program
        if hp is not None and (hp < 1 or hp & (hp - 1)):
            raise ValueError(f"heads_per_program must be a power of two >= 1, got {hp}")
        if self.partition_size and self.block_n and self.partition_size % self.block_n:
            raise ValueError("partition_size must be a multiple of block_n")


@triton.jit
def _decode_partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_m_ptr,
    part_l_ptr,
    stride_qs,
    stride_qh,
    stride_os,
    stride_oh,
    stride_bt,
    stride_kb,
    stride_ks,
    stride_kh,
    qk_scale_log2,
    partition_size,
    num_splits,
    k_scale_ptr,
    v_scale_ptr,
    stride_kv_scale,
    G: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    KV_FP8: tl.constexpr,
    PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = False,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1) * HEADS  # the first of the program's HEADS adjacent KV heads
    split = tl.program_id(2)
    part_start = split * partition_size
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    if PREFETCH:  # before the wait (kernels/triton_ops/pdl.py): only the host writes these
        seq_len = tl.load(seq_lens_ptr + seq, cache_modifier=".cg")
        _prefetch_first_tile(k_cache_ptr, v_cache_ptr, bt_row, seq_len, part_start, partition_size,
                             kv_head, stride_kb, stride_ks, stride_kh, HEADS * HEAD_DIM, BLOCK_SIZE, BLOCK_N)
        pdl_begin(PDL)
    else:
        pdl_begin(PDL)
        seq_len = tl.load(seq_lens_ptr + seq)
    # Partitions past the end of this sequence write nothing; phase 2 never reads them.
    if part_start < seq_len:
        part_end = tl.minimum(part_start + partition_size, seq_len)
        rows = tl.arange(0, BLOCK_G)
        head = kv_head * G + rows  # the program's query heads are adjacent too
        row_ok = rows < HEADS * G
        # Columns span the HEADS KV heads (adjacent in the cache row); a row reads and writes
        # only its own KV head's columns (``own``), so its query tile is block-diagonal.
        dims = tl.arange(0, HEADS * HEAD_DIM)
        own = row_ok[:, None] & ((rows // G)[:, None] == (dims // HEAD_DIM)[None, :])
        head_dims = dims % HEAD_DIM
        q_off = common.row_offsets(seq, head, stride_qs, stride_qh)
        q = tl.load(q_ptr + q_off[:, None] + head_dims[None, :], mask=own, other=0.0)
        m_i, l_i, acc = common.init_softmax_state(BLOCK_G, HEADS * HEAD_DIM)
        if KV_FP8:
            # Per row: the scale of the row's KV head (all equal for a per-tensor scale).
            row_kv = kv_head + rows // G
            k_scale = tl.load(k_scale_ptr + row_kv * stride_kv_scale, mask=row_ok, other=1.0)
            v_scale = tl.load(v_scale_ptr + row_kv * stride_kv_scale, mask=row_ok, other=1.0)
        for start in range(part_start, part_end, BLOCK_N):
            kpos = start + tl.arange(0, BLOCK_N)
            k_ok = kpos < part_end
            kv_off = common.paged_kv_offsets(bt_row, kpos, k_ok, kv_head, stride_kb, stride_ks,
                                             stride_kh, BLOCK_SIZE)
            k = tl.load(k_cache_ptr + kv_off[None, :] + dims[:, None], mask=k_ok[None, :], other=0.0)
            v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=k_ok[:, None], other=0.0)
            if KV_FP8:
                k = k.to(q.dtype)
                v = v.to(q.dtype)
            # The query sits at position seq_len - 1, so every key below part_end is visible.
            if KV_FP8:
                s = common.dot(q, k, IEEE_DOT) * (qk_scale_log2 * k_scale)[:, None]
            else:
                s = common.dot(q, k, IEEE_DOT) * qk_scale_log2
            s = tl.where(k_ok[None, :], s, float("-inf"))
            m_i, l_i, acc = common.online_softmax_step(s, v, m_i, l_i, acc, IEEE_DOT)

        out = acc / l_i[:, None]
        if KV_FP8:
            out = out * v_scale[:, None]
        o_ptrs = out_ptr + common.row_offsets(seq, head, stride_os, stride_oh)[:, None] + head_dims[None, :]
        if ONE_SPLIT:
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=own)
        elif seq_len <= partition_size:
            # The whole sequence is this partition: final output, phase 2 skips the sequence.
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=own)
        else:
            # Partial buffers are [S, Hq, num_splits(, D)], contiguous.
            num_heads = G * HEADS * tl.num_programs(1)
            stat_off = (seq.to(tl.int64) * num_heads + head) * num_splits + split
            tl.store(part_m_ptr + stat_off, m_i, mask=row_ok)
            tl.store(part_l_ptr + stat_off, l_i, mask=row_ok)
            tl.store(part_out_ptr + stat_off[:, None] * HEAD_DIM + head_dims[None, :], out, mask=own)


@triton.jit
def _l2_prefetch(ptrs, ok):
    """``prefetch.global.L2`` of the 128-byte line holding each of ``ptrs`` where ``ok``: a hint
    that reads nothing into registers or L1, so it cannot make a later load see stale data (L2
    is where the SMs' writes meet). CUDA only (inline PTX)."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def first_tile_lines(k_cache_ptr, bt_row, seq_len, part_start, partition_size, kv_head, stride_kb,
                     stride_ks, stride_kh, ROW: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Element offsets of the 128-byte lines holding the K (or V: same offsets) rows of the
    partition's first ``BLOCK_N`` keys, ``ROW`` elements from the program's first KV head, and
    which of them exist (keys before ``seq_len`` and the partition's end): ``[BLOCK_N, lines]``
    each. Reads the block-table entries past L1 (``.cg``): :func:`_prefetch_first_tile` calls
    this before the PDL wait."""
    kpos = part_start + tl.arange(0, BLOCK_N)
    ok = (kpos < seq_len) & (kpos < part_start + partition_size)
    row = common.paged_kv_offsets(bt_row, kpos, ok, kv_head, stride_kb, stride_ks, stride_kh, BLOCK_SIZE,
                                  CACHE=".cg")
    LINE: tl.constexpr = 1024 // k_cache_ptr.dtype.element_ty.primitive_bitwidth  # elements per 128 bytes
    LINES: tl.constexpr = ROW // LINE if ROW > LINE else 1
    off = row[:, None] + (tl.arange(0, LINES) * LINE)[None, :]
    return off, tl.broadcast_to(ok[:, None], [BLOCK_N, LINES])


@triton.jit
def _prefetch_first_tile(k_cache_ptr, v_cache_ptr, bt_row, seq_len, part_start, partition_size, kv_head,
                         stride_kb, stride_ks, stride_kh, ROW: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """Before the PDL wait: L2 prefetches of the lines :func:`first_tile_lines` names, in K and
    in V. At one token the attention is a chain of dependent reads after the wait (sequence
    length, block table, keys, values), each a memory latency; reading the sequence length
    before the wait and prefetching takes the first out of the chain and the keys and values out
    of DRAM while the kernels before (rotary + KV store, the qkv projection) end. No kernel
    writes the sequence lengths or the block tables (the host writes them, before the step), so
    they may be read before the wait (kernels/triton_ops/pdl.py); the block-table entries here
    only form addresses, and the loop after the wait reads them again (from L2 now). The one
    cache row that kernel writes (this step's key and value) may be prefetched before its store
    lands: the store updates the line in L2, and nothing was read into the SM."""
    off, ok = first_tile_lines(k_cache_ptr, bt_row, seq_len, part_start, partition_size, kv_head,
                               stride_kb, stride_ks, stride_kh, ROW, BLOCK_SIZE, BLOCK_N)
    _l2_prefetch(k_cache_ptr + off, ok)
    _l2_prefetch(v_cache_ptr + off, ok)


@triton.jit
def _decode_reduce_kernel(
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_m_ptr,
    part_l_ptr,
    stride_os,
    stride_oh,
    partition_size,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    PDL: tl.constexpr = False,
    EARLY: tl.constexpr = False,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    if EARLY:  # only the host writes it, before the step (kernels/triton_ops/pdl.py)
        seq_len = tl.load(seq_lens_ptr + seq, cache_modifier=".cg")
        pdl_begin(PDL)
    else:
        pdl_begin(PDL)
        seq_len = tl.load(seq_lens_ptr + seq)
    used = tl.cdiv(seq_len, partition_size)  # partitions phase 1 wrote for this sequence
    if used > 1:  # one partition: phase 1 wrote the final output itself
        _merge_partitions(seq, head, used, out_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
                          stride_os, stride_oh, num_splits, HEAD_DIM, BLOCK_SPLITS)


@triton.jit
def _merge_partitions(seq, head, used, out_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
                      stride_os, stride_oh, num_splits,
                      HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    splits = tl.arange(0, BLOCK_SPLITS)
    ok = splits < used
    base = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits
    m = tl.load(part_m_ptr + base + splits, mask=ok, other=float("-inf"))
    l_part = tl.load(part_l_ptr + base + splits, mask=ok, other=0.0)
    weight = tl.exp2(m - tl.max(m, axis=0)) * l_part  # 0 for unused partitions
    dims = tl.arange(0, HEAD_DIM)
    part_ptrs = part_out_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :]
    part = tl.load(part_ptrs, mask=ok[:, None], other=0.0)
    out = tl.sum(part * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    o_off = seq.to(tl.int64) * stride_os + head * stride_oh
    tl.store(out_ptr + o_off + dims, out.to(out_ptr.dtype.element_ty))


def _heads_per_program(config: DecodeConfig, num_kv_heads: int, head_dim: int) -> int:
    """KV heads per phase-1 program: the config's, else enough for 128 dims (at most Hk)."""
    heads = config.heads_per_program or max(1, 128 // head_dim)
    while num_kv_heads % heads:
        heads //= 2
    return heads


def prefetches(config: DecodeConfig, pdl: bool) -> bool:
    """Whether phase 1 asks L2 for its first tile before the PDL wait (:func:`_prefetch_first_tile`)
    and phase 2 reads the sequence length before it: with PDL only (CUDA sm_90+; the interpreter
    runs no PTX), as ``config.prefetch`` says, else ``_PREFETCH``."""
    return pdl and (_PREFETCH if config.prefetch is None else config.prefetch)


def _choose_tiles(config: DecodeConfig, num_pairs: int, max_seq_len: int, elem_bytes: int) -> tuple[int, int]:
    block_n = config.block_n or (64 if elem_bytes <= 2 else 32)
    if config.partition_size is not None:
        if config.partition_size % block_n:
            raise ValueError("partition_size must be a multiple of block_n")
        return config.partition_size, block_n
    # Split only as much as needed to give the GPU about _TARGET_PROGRAMS programs, and never
    # into pieces shorter than _MIN_PARTITION.
    splits = max(triton.cdiv(_TARGET_PROGRAMS, num_pairs), 1)
    partition = triton.next_power_of_2(triton.cdiv(max(max_seq_len, 1), splits))
    return max(partition, block_n, _MIN_PARTITION), block_n


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Triton :func:`kernels.reference.paged_decode_attention` (split-KV, GQA-packed).

    Keyword-only extras: ``out`` receives the result (``[S, Hq, D]``); ``config`` sets the
    tiling; ``pdl`` launches both phases with programmatic dependent launch
    (:mod:`kernels.triton_ops.pdl`). ``max_seq_len`` only sizes the grid, so an upper bound (e.g.
    for CUDA graphs) works.
    fp8 caches need ``k_scale``/``v_scale`` (as in the reference).
    """
    num_seqs, num_heads, head_dim, block_size, num_kv_heads, group = common.check_attention_inputs(
        q, key_cache, value_cache
    )
    fp8 = common.kv_scale_args(key_cache, k_scale, v_scale, num_kv_heads, seq_lens)
    config = config or DecodeConfig()
    out = common.output_like(q, out)
    if num_seqs == 0:
        return out
    heads = _heads_per_program(config, num_kv_heads, head_dim)
    num_programs = num_kv_heads // heads
    partition, block_n = _choose_tiles(config, num_seqs * num_programs, max_seq_len, q.element_size())
    num_splits = max(triton.cdiv(max_seq_len, partition), 1)
    block_tables = common.unit_stride_rows(block_tables)
    one_split = num_splits == 1
    shape = (num_seqs, num_heads, num_splits)
    # Unused on the one-split path: tiny placeholders keep the launch signature fixed.
    part_out = q.new_empty((1,) if one_split else (*shape, head_dim), dtype=torch.float32)
    part_m = q.new_empty((1,) if one_split else shape, dtype=torch.float32)
    part_l = q.new_empty((1,) if one_split else shape, dtype=torch.float32)
    # The program's KV heads are one run of heads * head_dim elements of a cache row (contiguous
    # caches, checked above).
    _decode_partition_kernel[(num_seqs, num_programs, num_splits)](
        q, key_cache, value_cache, block_tables, seq_lens, out, part_out, part_m, part_l,
        *common.paged_strides(q, out, block_tables, key_cache),
        scale * common.LOG2E, partition, num_splits, fp8.k_scale, fp8.v_scale, fp8.stride,
        G=group,
        HEADS=heads,
        BLOCK_G=max(16, triton.next_power_of_2(heads * group)),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        ONE_SPLIT=one_split,
        IEEE_DOT=q.dtype == torch.float32,
        KV_FP8=fp8.fp8,
        PREFETCH=prefetches(config, pdl),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_launch(pdl),
    )
    if not one_split:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            seq_lens, out, part_out, part_m, part_l,
            out.stride(0), out.stride(1), partition, num_splits,
            HEAD_DIM=head_dim,
            BLOCK_SPLITS=triton.next_power_of_2(num_splits),
            EARLY=prefetches(config, pdl),
            num_warps=4,
            **pdl_launch(pdl),
        )
    return out
