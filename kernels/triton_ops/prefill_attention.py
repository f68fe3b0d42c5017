"""Varlen causal attention of query chunks over their paged context (prefill + mixed batches).

One program computes a tile of ``BLOCK_M`` rows for one sequence and one KV head: the rows
are ``BLOCK_Q`` consecutive query tokens times the ``G = Hq // Hk`` query heads that share
the KV head (GQA packing), so K/V tiles are loaded once for the whole group and a
single-token decode still fills ``G`` rows of the matrix product. The keys are gathered
token by token through the block table, so the key tile ``BLOCK_N`` is independent of the
cache's block size. Softmax is online, in float32.

Split-KV (flash-decoding) path, for steps with few tiles over a long context (a short chunk
at the end of a long prompt, with or without decodes beside it): each (tile, KV head) is
split over several programs along the context, ``partition`` keys each (a power of two, a
multiple of ``BLOCK_N``). A program writes its rows' unnormalised output and softmax
statistics (running max in log2 units, sum of weights) to float32 buffers; a combine kernel
merges a tile's partitions in a fixed order (deterministic). Tiles whose context fits in
the first partition (decodes and short sequences beside the long one) are written whole by
their first program and skipped by the combine. :class:`PrefillConfig` says when to split;
steps it does not split run the same code as without the path (``SPLIT`` is a constexpr).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.triton_ops import attention_common as common
from kernels.triton_ops.decode_attention import DecodeConfig, paged_decode_attention


@dataclass(frozen=True)
class PrefillConfig:
    """Tiling of :func:`paged_attention` (``None``: chosen from the shapes).

    ``block_m``: query rows per program (tokens x query heads of one KV head), a power of
    two >= 16 and >= Hq/Hk; ``block_n``: keys per inner step, a power of two >= 16.

    Split-KV (see the module docstring): a step is split
    when ``split_kv`` is on, its longest sequence has at least ``split_min_context`` tokens and
    it has fewer than ``split_target_programs`` (tile, KV head) programs (counted as
    ``cdiv(tokens, tile tokens) x KV heads``). It is then split into about
    ``split_target_programs / programs`` partitions of the longest context, each at least
    ``split_min_partition`` keys (rounded up to a power of two >= ``block_n``). The defaults
    leave W1/W3-shaped steps (512-token prompts, contexts under 4,096; 8,192-token chunks:
    4,096 programs on llama3-8b) unsplit, and split a 224-token chunk at the end of a 32k
    context (112 programs on llama3-8b: 8 partitions of 4,096 keys). On by default together
    with ``long_chunk_tiles`` since W6's ITL run on an H200 (docs/DECISIONS.md 96: a 32k
    prompt's chunked prefill 26-35% faster, the decodes beside it 25-30% faster at the median);
    ``bench/bench_long.py --prefill-split-kv`` / ``--prefill-long-chunk-tiles`` and
    ``bench/bench_kernels.py --prefill-split-kv both`` A/B them.
    """

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int = 2
    split_kv: bool = True
    split_min_context: int = 4096  # tokens of the longest sequence
    # About 8 per multiprocessor of a 132-SM H200: 64-row tiles keep 2-4 programs resident
    # per SM, so the split step still runs a few waves.
    split_target_programs: int = 1024
    split_min_partition: int = 512  # keys per split program; the merge's cost stays small
    # Steps with a long context (>= split_min_context): size block_m from the longest query (the
    # chunk) instead of the mean (decodes beside a chunk pull the mean to a few rows, and every
    # tile of the chunk re-reads the whole context's K/V).
    long_chunk_tiles: bool = True
    # Keys per inner step (``block_n`` None, 16-bit caches) when the step's longest sequence has
    # at most ``short_context`` tokens: a program's last key tile straddles its diagonal, and
    # with 16-token query tiles over short contexts that masked tile is a large part of the
    # work (H200, docs/DECISIONS.md 122: 512-token prompts 9-10% faster at 32 keys than 64,
    # contexts of 2,048 4% slower).
    short_context: int = 1024
    short_context_block_n: int = 32

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "short_context_block_n"):
            value = getattr(self, name)
            if value is not None and (value & (value - 1) or value < 16):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        for name in ("split_min_context", "split_target_programs", "split_min_partition", "short_context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@triton.jit
def _attend_tile(
    q,
    m_i,
    l_i,
    acc,
    k_cache_ptr,
    v_cache_ptr,
    bt_row,
    start,
    kv_end,
    q_pos,
    kv_head,
    stride_kb,
    stride_ks,
    stride_kh,
    qk_scale_log2,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """One online-softmax step over keys ``start .. start + BLOCK_N``.

    ``MASKED=False`` only for tiles that every row may see whole (below the tile's first
    query position, hence also below ``kv_end``): no bounds or causal masks there.
    """
    kpos = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    if MASKED:
        k_ok = kpos < kv_end
        kv_off = common.paged_kv_offsets(bt_row, kpos, k_ok, kv_head, stride_kb, stride_ks, stride_kh,
                                         BLOCK_SIZE)
        k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=k_ok[:, None], other=0.0)
    else:
        kv_off = common.paged_kv_offsets(bt_row, kpos, None, kv_head, stride_kb, stride_ks, stride_kh,
                                         BLOCK_SIZE)
        k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :])
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :])
    if KV_FP8:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s = common.dot(q, tl.trans(k), IEEE_DOT) * qk_scale_log2
    if MASKED:
        s = tl.where((kpos[None, :] <= q_pos[:, None]) & k_ok[None, :], s, float("-inf"))
    return common.online_softmax_step(s, v, m_i, l_i, acc, IEEE_DOT)


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_ptr,
    seq_lens_ptr,
    out_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_kb,
    stride_ks,
    stride_kh,
    qk_scale_log2,
    k_scale_ptr,
    v_scale_ptr,
    stride_kv_scale,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    partition_size,
    num_splits,
    num_tokens,
    G: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    KV_FP8: tl.constexpr,
    SPLIT: tl.constexpr,
):
    q_block = tl.program_id(0)
    seq = tl.program_id(1)
    if SPLIT:
        # Axis 2 enumerates (KV head, partition of the context).
        kv_head = tl.program_id(2) // num_splits
        split = tl.program_id(2) % num_splits
    else:
        kv_head = tl.program_id(2)
        split = 0

    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # positions before the first query row (cached prefix)
    # Keys before the tile's first query position are visible to all its rows: whole
    # tiles of them need no mask. The rest, up to the last row's position, is masked.
    first_pos = ctx_len + q_block * BLOCK_Q
    full_end = (first_pos // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(first_pos + BLOCK_Q, seq_len)
    if SPLIT:
        # This program's keys: one partition (a multiple of BLOCK_N, so no key tile crosses
        # its ends); partitions past the tile's last visible key have nothing to do.
        part_start = split * partition_size
        part_end = tl.minimum(part_start + partition_size, kv_end)
        unmasked_end = tl.minimum(full_end, part_end)
        masked_start = tl.maximum(full_end, part_start)
    else:
        part_start = 0
        part_end = kv_end
        unmasked_end = full_end
        masked_start = full_end
    # Programs past this sequence's query rows have nothing to do (the grid covers max_query_len).
    if (q_block * BLOCK_Q < q_len) & (part_start < kv_end):
        rows = tl.arange(0, BLOCK_M)
        tok = q_block * BLOCK_Q + rows // G  # query row within the sequence
        head = kv_head * G + rows % G
        row_ok = (rows < BLOCK_Q * G) & (tok < q_len)
        q_pos = ctx_len + tok  # absolute position of each row
        dims = tl.arange(0, HEAD_DIM)
        q_off = common.row_offsets(q_start + tok, head, stride_qt, stride_qh)
        q = common.load_rows(q_ptr, q_off, row_ok, dims)
        m_i, l_i, acc = common.init_softmax_state(BLOCK_M, HEAD_DIM)
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        if KV_FP8:
            qk_scale_log2 = qk_scale_log2 * tl.load(k_scale_ptr + kv_head * stride_kv_scale)

        for start in range(part_start, unmasked_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, bt_row, start, kv_end, q_pos, kv_head,
                stride_kb, stride_ks, stride_kh, qk_scale_log2,
                BLOCK_SIZE, HEAD_DIM, BLOCK_N, False, IEEE_DOT, KV_FP8,
            )
        for start in range(masked_start, part_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, bt_row, start, kv_end, q_pos, kv_head,
                stride_kb, stride_ks, stride_kh, qk_scale_log2,
                BLOCK_SIZE, HEAD_DIM, BLOCK_N, True, IEEE_DOT, KV_FP8,
            )

        o_off = common.row_offsets(q_start + tok, head, stride_ot, stride_oh)
        if SPLIT:
            if kv_end <= partition_size:
                # The tile's whole context is this (first) partition: final output, the
                # combine skips the tile.
                _store_normalised(out_ptr, o_off, row_ok, dims, l_i, acc, v_scale_ptr,
                                  kv_head * stride_kv_scale, KV_FP8)
            else:
                # Partial buffers are [num_splits, T, Hq(, D)], contiguous; rows that see no
                # key of this partition store m = -1e30, l = 0, acc = 0 (weight 0 in the merge).
                num_heads = G * (tl.num_programs(2) // num_splits)
                stat_off = (split * num_tokens + (q_start + tok).to(tl.int64)) * num_heads + head
                tl.store(part_m_ptr + stat_off, m_i, mask=row_ok)
                tl.store(part_l_ptr + stat_off, l_i, mask=row_ok)
                tl.store(part_acc_ptr + stat_off[:, None] * HEAD_DIM + dims[None, :], acc,
                         mask=row_ok[:, None])
        else:
            _store_normalised(out_ptr, o_off, row_ok, dims, l_i, acc, v_scale_ptr,
                              kv_head * stride_kv_scale, KV_FP8)


@triton.jit
def _store_normalised(out_ptr, o_off, row_ok, dims, l_i, acc, v_scale_ptr, v_scale_off,
                      KV_FP8: tl.constexpr):
    """Store ``acc / l_i`` (times the V scale of an fp8 cache) at rows ``o_off``."""
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows only; real rows see their own key
    out = acc / l_i[:, None]
    if KV_FP8:
        out = out * tl.load(v_scale_ptr + v_scale_off)
    common.store_rows(out_ptr, o_off, row_ok, dims, out)


@triton.jit
def _prefill_combine_kernel(
    query_start_ptr,
    seq_lens_ptr,
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    stride_ot,
    stride_oh,
    v_scale_ptr,
    stride_kv_scale,
    partition_size,
    num_tokens,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Merge the partitions of one (tile, KV head) of the split path, in partition order."""
    q_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_end = tl.minimum(seq_len - q_len + q_block * BLOCK_Q + BLOCK_Q, seq_len)
    used = tl.cdiv(kv_end, partition_size)  # partitions phase 1 wrote for this tile
    if (q_block * BLOCK_Q < q_len) & (used > 1):  # one partition: phase 1 wrote the output
        rows = tl.arange(0, BLOCK_M)
        tok = q_block * BLOCK_Q + rows // G
        head = kv_head * G + rows % G
        row_ok = (rows < BLOCK_Q * G) & (tok < q_len)
        dims = tl.arange(0, HEAD_DIM)
        num_heads = G * tl.num_programs(2)
        m_i, l_i, acc = common.init_softmax_state(BLOCK_M, HEAD_DIM)
        for split in range(0, used):
            stat_off = (split * num_tokens + (q_start + tok).to(tl.int64)) * num_heads + head
            m_s = tl.load(part_m_ptr + stat_off, mask=row_ok, other=-1.0e30)
            l_s = tl.load(part_l_ptr + stat_off, mask=row_ok, other=0.0)
            acc_s = tl.load(part_acc_ptr + stat_off[:, None] * HEAD_DIM + dims[None, :],
                            mask=row_ok[:, None], other=0.0)
            m_new = tl.maximum(m_i, m_s)
            alpha = tl.exp2(m_i - m_new)
            beta = tl.exp2(m_s - m_new)
            l_i = l_i * alpha + l_s * beta
            acc = acc * alpha[:, None] + acc_s * beta[:, None]
            m_i = m_new
        o_off = common.row_offsets(q_start + tok, head, stride_ot, stride_oh)
        _store_normalised(out_ptr, o_off, row_ok, dims, l_i, acc, v_scale_ptr,
                          kv_head * stride_kv_scale, KV_FP8)


class PrefillTiles(NamedTuple):
    """The tiling :func:`paged_attention` launches for a step (see :func:`choose_tiles`)."""

    block_m: int  # query rows per program
    block_q: int  # query tokens per program (block_m // G)
    block_n: int
    num_warps: int
    partition: int  # keys per program on the split-KV path; 0: not split
    num_splits: int  # partitions of the longest context (1: not split)


def choose_tiles(
    config: PrefillConfig,
    num_tokens: int,
    num_seqs: int,
    group: int,
    num_kv_heads: int,
    max_seq_len: int,
    elem_bytes: int,
    max_query_len: int | None = None,
) -> PrefillTiles:
    """The tiling of a step of these shapes (host ints only: no device sync)."""
    block_m = config.block_m
    long_context = max_seq_len >= config.split_min_context
    if block_m is None:
        # Mostly short queries (decodes mixed with chunks): rows past a sequence's q_len are
        # wasted matrix work, so size the tile to the mean query length; with a long context
        # (long_chunk_tiles) to the longest query, whose tiles each read that whole context.
        rows = triton.cdiv(num_tokens, num_seqs) * group
        if config.long_chunk_tiles and long_context and max_query_len is not None:
            rows = max(rows, max_query_len * group)
        block_m = min(64, triton.next_power_of_2(rows))
    block_m = max(block_m, 16, triton.next_power_of_2(group))
    block_n = config.block_n
    if block_n is None:
        if elem_bytes > 2:
            block_n = 32
        elif max_seq_len <= config.short_context:
            block_n = config.short_context_block_n
        else:
            block_n = 64
    # Defaults from sweeps on an H200 (bf16; docs/benchmarks/kernels.md, DECISIONS 122): 64-row
    # tiles with 4 warps beat 128-row tiles and 8 warps on fresh, prefixed and mixed batches;
    # keys per step as chosen above (32 over short contexts, else 64).
    num_warps = config.num_warps or 4
    block_q = block_m // group
    partition = 0
    programs = triton.cdiv(num_tokens, block_q) * num_kv_heads
    if config.split_kv and long_context and programs < config.split_target_programs:
        splits = triton.cdiv(config.split_target_programs, programs)
        partition = max(triton.cdiv(max_seq_len, splits), config.split_min_partition, block_n)
        partition = triton.next_power_of_2(partition)
        if partition >= max_seq_len:
            partition = 0  # one partition: nothing to split
    num_splits = triton.cdiv(max_seq_len, partition) if partition else 1
    return PrefillTiles(block_m, block_q, block_n, num_warps, partition, num_splits)


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    num_decodes: int = 0,
    config: PrefillConfig | None = None,
    decode_config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Triton :func:`kernels.reference.paged_attention`.

    Keyword-only extras: ``out`` receives the result (``[T, Hq, D]``); ``num_decodes`` (the
    reference's hint: the first ``num_decodes`` sequences have one query token each) sends
    those sequences to :func:`paged_decode_attention` (``decode_config``) and the rest to this
    kernel, two launches into ``out``; ``config`` sets the tiling and the split-KV path. fp8
    caches need ``k_scale``/``v_scale`` (as in the reference). ``max_seq_len`` must bound every
    sequence's length (it sizes the split path's partitions).

    Why two launches: in one launch a decode is a tile of ``G`` real rows out of ``BLOCK_M``
    on the tensor cores, and its programs for the other query tiles start and exit empty.
    Measured on the H200 (docs/DECISIONS.md 122, device time), a W3 prompt step's attention (16
    prompts of 512 tokens beside 240 decodes, llama3-1b's heads) took 160 us in two launches
    against 222 in one (64-key tiles, as before).
    """
    num_tokens, num_heads, head_dim, block_size, num_kv_heads, group = common.check_attention_inputs(
        q, key_cache, value_cache
    )
    fp8 = common.kv_scale_args(key_cache, k_scale, v_scale, num_kv_heads, seq_lens)
    config = config or PrefillConfig()
    out = common.output_like(q, out)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if num_decodes > 0:
        if num_decodes > min(num_seqs, num_tokens):
            raise ValueError(f"num_decodes {num_decodes} exceeds the step's {num_seqs} sequences")
        # The decodes' query rows are the first num_decodes rows (one token each, packed first).
        paged_decode_attention(q[:num_decodes], key_cache, value_cache, block_tables[:num_decodes],
                               seq_lens[:num_decodes], scale, max_seq_len, out=out[:num_decodes],
                               config=decode_config, k_scale=k_scale, v_scale=v_scale)
        if num_decodes == num_seqs:
            return out
        # The rest: query_start_loc keeps absolute rows, so q and out stay whole.
        block_tables = block_tables[num_decodes:]
        query_start_loc = query_start_loc[num_decodes:]
        seq_lens = seq_lens[num_decodes:]
        num_seqs -= num_decodes
    tiles = choose_tiles(config, num_tokens - num_decodes, num_seqs, group, num_kv_heads, max_seq_len,
                         q.element_size(), max_query_len)
    block_m, block_q, partition, num_splits = tiles.block_m, tiles.block_q, tiles.partition, tiles.num_splits
    q_blocks = triton.cdiv(max_query_len, block_q)
    block_tables = common.unit_stride_rows(block_tables)
    if partition:
        part_m = q.new_empty((num_splits, num_tokens, num_heads), dtype=torch.float32)
        part_l = q.new_empty((num_splits, num_tokens, num_heads), dtype=torch.float32)
        part_acc = q.new_empty((num_splits, num_tokens, num_heads, head_dim), dtype=torch.float32)
    else:
        # Unused on the unsplit path: placeholders keep the launch signature fixed.
        part_m = part_l = part_acc = seq_lens
    _prefill_kernel[(q_blocks, num_seqs, num_kv_heads * num_splits)](
        q,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        out,
        *common.paged_strides(q, out, block_tables, key_cache),
        scale * common.LOG2E,
        fp8.k_scale,
        fp8.v_scale,
        fp8.stride,
        part_acc,
        part_m,
        part_l,
        partition,
        num_splits,
        num_tokens,
        G=group,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=tiles.block_n,
        IEEE_DOT=q.dtype == torch.float32,
        KV_FP8=fp8.fp8,
        SPLIT=bool(partition),
        num_warps=tiles.num_warps,
        num_stages=config.num_stages,
    )
    if partition:
        _prefill_combine_kernel[(q_blocks, num_seqs, num_kv_heads)](
            query_start_loc,
            seq_lens,
            out,
            part_acc,
            part_m,
            part_l,
            out.stride(0),
            out.stride(1),
            fp8.v_scale,
            fp8.stride,
            partition,
            num_tokens,
            G=group,
            HEAD_DIM=head_dim,
            BLOCK_M=block_m,
            BLOCK_Q=block_q,
            KV_FP8=fp8.fp8,
            num_warps=4,
        )
    return out
