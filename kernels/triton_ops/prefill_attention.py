"""Varlen causal attention of query chunks over their paged context (prefill + mixed batches).

One program computes a tile of ``BLOCK_M`` rows for one sequence and one KV head: the rows
are ``BLOCK_Q`` consecutive query tokens times the ``G = Hq // Hk`` query heads that share
the KV head (GQA packing), so K/V tiles are loaded once for the whole group and a
single-token decode still fills ``G`` rows of the matrix product. The keys are gathered
token by token through the block table, so the key tile ``BLOCK_N`` is independent of the
cache's block size. Softmax is online, in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_ops import attention_common as common


@dataclass(frozen=True)
class PrefillConfig:
    """Tiling of :func:`paged_attention` (``None``: chosen from the shapes).

    ``block_m``: query rows per program (tokens x query heads of one KV head), a power of
    two >= 16 and >= Hq/Hk; ``block_n``: keys per inner step, a power of two >= 16.
    """

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value is not None and (value & (value - 1) or value < 16):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


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
    G: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    q_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    # Programs past this sequence's query rows have nothing to do (the grid covers max_query_len).
    if q_block * BLOCK_Q < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx_len = seq_len - q_len  # positions before the first query row (cached prefix)

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

        # Keys before the tile's first query position are visible to all its rows: whole
        # tiles of them need no mask. The rest, up to the last row's position, is masked.
        first_pos = ctx_len + q_block * BLOCK_Q
        full_end = (first_pos // BLOCK_N) * BLOCK_N
        kv_end = tl.minimum(first_pos + BLOCK_Q, seq_len)
        for start in range(0, full_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, bt_row, start, kv_end, q_pos, kv_head,
                stride_kb, stride_ks, stride_kh, qk_scale_log2,
                BLOCK_SIZE, HEAD_DIM, BLOCK_N, False, IEEE_DOT, KV_FP8,
            )
        for start in range(full_end, kv_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, bt_row, start, kv_end, q_pos, kv_head,
                stride_kb, stride_ks, stride_kh, qk_scale_log2,
                BLOCK_SIZE, HEAD_DIM, BLOCK_N, True, IEEE_DOT, KV_FP8,
            )

        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows only; real rows see their own key
        out = acc / l_i[:, None]
        if KV_FP8:
            out = out * tl.load(v_scale_ptr + kv_head * stride_kv_scale)
        o_off = common.row_offsets(q_start + tok, head, stride_ot, stride_oh)
        common.store_rows(out_ptr, o_off, row_ok, dims, out)


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
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Triton :func:`kernels.reference.paged_attention`.

    Keyword-only extras: ``out`` receives the result (``[T, Hq, D]``); ``config`` sets the
    tiling. fp8 caches need ``k_scale``/``v_scale`` (as in the reference).
    """
    num_tokens, _, head_dim, block_size, num_kv_heads, group = common.check_attention_inputs(
        q, key_cache, value_cache
    )
    fp8 = common.kv_scale_args(key_cache, k_scale, v_scale, num_kv_heads, seq_lens)
    config = config or PrefillConfig()
    out = common.output_like(q, out)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    narrow = q.element_size() <= 2
    block_m = config.block_m
    if block_m is None:
        # Mostly short queries (decodes mixed with chunks): rows past a sequence's q_len are
        # wasted matrix work, so size the tile to the mean query length.
        mean_rows = triton.cdiv(num_tokens, num_seqs) * group
        block_m = min(64, triton.next_power_of_2(mean_rows))
    block_m = max(block_m, 16, triton.next_power_of_2(group))
    block_n = config.block_n or (64 if narrow else 32)
    # Defaults from a sweep on an H200 (bf16, llama3-8b heads; docs/benchmarks/kernels.md):
    # 64x64 tiles with 4 warps beat 128-row tiles and 8 warps on fresh, prefixed and mixed batches.
    num_warps = config.num_warps or 4
    block_q = block_m // group
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    block_tables = common.unit_stride_rows(block_tables)
    _prefill_kernel[grid](
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
        G=group,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        IEEE_DOT=q.dtype == torch.float32,
        KV_FP8=fp8.fp8,
        num_warps=num_warps,
        num_stages=config.num_stages,
    )
    return out
