"""Split-KV decode attention (flash-decoding) over the paged cache.

Phase 1: one program per (sequence, KV head, partition of the context). Its rows are the
``G = Hq // Hk`` query heads that share the KV head (padded to 16 for the matrix unit), so
each K/V tile is read from memory once for the whole group. It writes the partition's
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

# Below this many (sequence, KV head) programs the context is split to fill the GPU (about
# four per multiprocessor of an H100/H200; on an H200, batch 64 x 8 KV heads at 2k tokens ran
# fastest unsplit, 92% of copy bandwidth, against 79% split in two).
_TARGET_PROGRAMS = 512


@dataclass(frozen=True)
class DecodeConfig:
    """Tiling of :func:`paged_decode_attention` (``None``: chosen from the shapes)."""

    partition_size: int | None = None  # context tokens per phase-1 program; multiple of block_n
    block_n: int | None = None  # keys per inner step
    num_warps: int = 2
    num_stages: int = 3

    def __post_init__(self) -> None:
        if self.block_n is not None and (self.block_n & (self.block_n - 1) or self.block_n < 16):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
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
    BLOCK_G: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    part_start = split * partition_size
    # Partitions past the end of this sequence write nothing; phase 2 never reads them.
    if part_start < seq_len:
        part_end = tl.minimum(part_start + partition_size, seq_len)
        rows = tl.arange(0, BLOCK_G)
        head = kv_head * G + rows
        row_ok = rows < G
        dims = tl.arange(0, HEAD_DIM)
        q = common.load_rows(q_ptr, common.row_offsets(seq, head, stride_qs, stride_qh), row_ok, dims)
        m_i, l_i, acc = common.init_softmax_state(BLOCK_G, HEAD_DIM)
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        if KV_FP8:
            qk_scale_log2 = qk_scale_log2 * tl.load(k_scale_ptr + kv_head * stride_kv_scale)
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
            s = tl.where(k_ok[None, :], common.dot(q, k, IEEE_DOT) * qk_scale_log2, float("-inf"))
            m_i, l_i, acc = common.online_softmax_step(s, v, m_i, l_i, acc, IEEE_DOT)

        out = acc / l_i[:, None]
        if KV_FP8:
            out = out * tl.load(v_scale_ptr + kv_head * stride_kv_scale)
        o_off = common.row_offsets(seq, head, stride_os, stride_oh)
        if ONE_SPLIT:
            common.store_rows(out_ptr, o_off, row_ok, dims, out)
        elif seq_len <= partition_size:
            # The whole sequence is this partition: final output, phase 2 skips the sequence.
            common.store_rows(out_ptr, o_off, row_ok, dims, out)
        else:
            # Partial buffers are [S, Hq, num_splits(, D)], contiguous.
            stat_off = (seq.to(tl.int64) * G * tl.num_programs(1) + head) * num_splits + split
            tl.store(part_m_ptr + stat_off, m_i, mask=row_ok)
            tl.store(part_l_ptr + stat_off, l_i, mask=row_ok)
            tl.store(part_out_ptr + stat_off[:, None] * HEAD_DIM + dims[None, :], out, mask=row_ok[:, None])


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
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
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


def _choose_tiles(config: DecodeConfig, num_pairs: int, max_seq_len: int, elem_bytes: int) -> tuple[int, int]:
    block_n = config.block_n or (64 if elem_bytes <= 2 else 32)
    if config.partition_size is not None:
        if config.partition_size % block_n:
            raise ValueError("partition_size must be a multiple of block_n")
        return config.partition_size, block_n
    # Split only as much as needed to give the GPU about _TARGET_PROGRAMS programs, and never
    # into pieces so short that the merge costs more than it saves.
    splits = max(triton.cdiv(_TARGET_PROGRAMS, num_pairs), 1)
    partition = triton.next_power_of_2(triton.cdiv(max(max_seq_len, 1), splits))
    return max(partition, 4 * block_n, 256), block_n


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
) -> torch.Tensor:
    """Triton :func:`kernels.reference.paged_decode_attention` (split-KV, GQA-packed).

    Keyword-only extras: ``out`` receives the result (``[S, Hq, D]``); ``config`` sets the
    tiling. ``max_seq_len`` only sizes the grid, so an upper bound (e.g. for CUDA graphs) works.
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
    partition, block_n = _choose_tiles(config, num_seqs * num_kv_heads, max_seq_len, q.element_size())
    num_splits = max(triton.cdiv(max_seq_len, partition), 1)
    block_tables = common.unit_stride_rows(block_tables)
    one_split = num_splits == 1
    shape = (num_seqs, num_heads, num_splits)
    # Unused on the one-split path: tiny placeholders keep the launch signature fixed.
    part_out = q.new_empty((1,) if one_split else (*shape, head_dim), dtype=torch.float32)
    part_m = q.new_empty((1,) if one_split else shape, dtype=torch.float32)
    part_l = q.new_empty((1,) if one_split else shape, dtype=torch.float32)
    _decode_partition_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, key_cache, value_cache, block_tables, seq_lens, out, part_out, part_m, part_l,
        *common.paged_strides(q, out, block_tables, key_cache),
        scale * common.LOG2E, partition, num_splits, fp8.k_scale, fp8.v_scale, fp8.stride,
        G=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        ONE_SPLIT=one_split,
        IEEE_DOT=q.dtype == torch.float32,
        KV_FP8=fp8.fp8,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if not one_split:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            seq_lens, out, part_out, part_m, part_l,
            out.stride(0), out.stride(1), partition, num_splits,
            HEAD_DIM=head_dim,
            BLOCK_SPLITS=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out
