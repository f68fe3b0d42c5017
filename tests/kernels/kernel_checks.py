"""Kernel-vs-reference checks shared by the interpreted (CPU) and the GPU test modules.

Each check draws fresh random inputs (never zeros), poisons the outputs it can (NaN), runs
the Triton op and its torch reference on the same inputs, and raises AssertionError on a
mismatch. ``CHECKS`` maps a name to a check; ``python kernel_checks.py [DTYPE [CHECK ...]]``
runs them (default: all, float32) on the CPU and prints one JSON object
``{name: "ok" | traceback}`` (the interpreted tests run it in a subprocess with
``TRITON_INTERPRET=1`` so that triton sees the variable at import time).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels import triton_ops as tops
from kernels.quant_reference import quantize_fp8_rows
from kernels.triton_ops.decode_attention import first_tile_lines
from kernels.triton_ops.fp8_common import software_fp8
from kernels.triton_ops.moe import e4m3_to


@dataclass(frozen=True)
class Target:
    """Where and how a check runs: ``big`` adds longer contexts (GPU only)."""

    device: str
    dtype: torch.dtype
    big: bool = False


def assert_close(
    out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 1.0
) -> None:
    """Compare with a tolerance reasoned from the dtype.

    float32: kernel and reference do the same float32 arithmetic in a different order, so
    they agree to a few ulps of values of order 1 (1e-5). bf16: both round their float32
    result to bf16 (half an ulp each, 2^-9 relative), and the attention kernels also round
    the softmax weights to bf16 before the P@V product (another 2^-9 relative on a weighted
    mean of values of order 1): two bf16 ulps (2^-7 ~ 7.8e-3) of absolute and relative slack
    bound all of it; the relative norm error must stay well under that (4e-3).
    ``scale`` widens the absolute tolerance for outputs of larger magnitude.
    """
    assert not torch.isnan(out).any(), f"{what}: NaN in output (unwritten or poisoned elements)"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    o, r = out.double(), ref.double()
    if dtype == torch.float32:
        atol, rtol, rel_norm = 2e-5 * scale, 2e-5, 1e-5
    else:
        atol, rtol, rel_norm = 1.6e-2 * scale, 1.6e-2, 4e-3
    err = (o - r).abs()
    bad = err > atol + rtol * r.abs()
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{bad.numel()} elements off, max abs err {float(err.max()):.3e}"
    )
    norm_err = float((o - r).norm() / r.norm().clamp_min(1e-30))
    assert norm_err <= rel_norm, f"{what}: relative norm error {norm_err:.3e} > {rel_norm}"


def _randn(*shape: int, t: Target, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=t.device, dtype=t.dtype)


# ---------------------------------------------------------------------------------------
# Paged batches
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PagedBatch:
    """A batch over a random, fully filled cache with shuffled, non-contiguous block tables."""

    q: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    max_query_len: int
    max_seq_len: int
    scale: float


def make_paged_batch(
    specs: list[tuple[int, int]],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    t: Target,
    gen: torch.Generator,
    seq_len_slack: int = 0,
) -> PagedBatch:
    """``specs``: ``(seq_len, q_len)`` per sequence. ``seq_len_slack`` pads max_seq_len."""
    max_seq_len = max(s for s, _ in specs) + seq_len_slack
    blocks_per_seq = -(-max_seq_len // block_size)
    num_blocks = blocks_per_seq * len(specs) + 5
    # Every sequence owns distinct, shuffled blocks; table columns past a sequence's length
    # point at blocks of other sequences (valid ids, wrong data: a kernel that reads them fails).
    perm = torch.randperm(num_blocks, generator=gen)[: blocks_per_seq * len(specs)]
    table = perm.view(len(specs), blocks_per_seq).to(torch.int32)
    wide = torch.randint(0, num_blocks, (len(specs), blocks_per_seq + 3), generator=gen, dtype=torch.int32)
    wide[:, 1 : blocks_per_seq + 1] = table
    block_tables = wide[:, 1 : blocks_per_seq + 1]  # non-contiguous view (row stride differs)
    kv_heads_total = num_kv_heads * (group + 2)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    q_lens = [ql for _, ql in specs]
    total = sum(q_lens)
    # q is a strided view of a fused qkv projection, as the model produces it.
    qkv = _randn(total, kv_heads_total, head_dim, t=t, gen=gen)
    q = qkv[:, : num_kv_heads * group]
    starts = [0]
    for ql in q_lens:
        starts.append(starts[-1] + ql)
    return PagedBatch(
        q=q,
        key_cache=_randn(*cache_shape, t=t, gen=gen),
        value_cache=_randn(*cache_shape, t=t, gen=gen),
        block_tables=block_tables.to(t.device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=t.device),
        seq_lens=torch.tensor([s for s, _ in specs], dtype=torch.int32, device=t.device),
        max_query_len=max(q_lens),
        max_seq_len=max_seq_len,
        scale=head_dim**-0.5,
    )


def with_kv_cache(b: PagedBatch, kv: str) -> tuple[PagedBatch, dict[str, torch.Tensor]]:
    """``b`` with its caches as ``kv`` says ("": as made; "fp8": e4m3 with one scale; "fp8/head":
    one scale per KV head, from the caches' own amax) and the scale arguments the ops take."""
    if not kv:
        return b, {}
    from kernels import quant_reference as qref

    hk, d = b.key_cache.shape[2], b.key_cache.shape[3]
    per_head = kv == "fp8/head"
    ks = qref.fp8_kv_scale(b.key_cache.reshape(-1, hk, d), per_head)
    vs = qref.fp8_kv_scale(b.value_cache.reshape(-1, hk, d), per_head)
    kc = qref.quantize_fp8_with_scale(b.key_cache, ks.reshape(-1, 1))
    vc = qref.quantize_fp8_with_scale(b.value_cache, vs.reshape(-1, 1))
    return dataclasses.replace(b, key_cache=kc, value_cache=vc), {"k_scale": ks, "v_scale": vs}


# (block_size, head_dim, GQA group, KV heads): every block size, both head dims, ratios 1/4/8.
ATTN_SHAPES = [(8, 64, 1, 2), (16, 128, 4, 2), (32, 64, 8, 1), (64, 128, 8, 2), (16, 64, 1, 3)]


def _prefill_specs(bs: int, big: bool) -> list[tuple[int, int]]:
    specs = [
        (2 * bs + 3, bs + 5),  # chunk after a cached prefix, crossing block boundaries
        (1, 1),  # first token
        (bs, 1),  # decode on a block boundary
        (bs + 1, 1),  # decode just across it
        (2 * bs - 1, 2 * bs - 1),  # fresh prefill, odd length
        (3 * bs, bs),  # chunk ending on a boundary
        (17, 9),
    ]
    if big:
        specs += [(1000, 1000), (777, 300), (2048, 1)]
    return specs


def check_paged_attention(t: Target) -> None:
    gen = torch.Generator().manual_seed(1)
    configs = [tops.PrefillConfig(), tops.PrefillConfig(block_m=64, block_n=32)]
    for bs, d, g, hk in ATTN_SHAPES:
        for cfg in configs:
            b = make_paged_batch(_prefill_specs(bs, t.big), hk, g, d, bs, t, gen)
            args = (b.q, b.key_cache, b.value_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                    b.scale, b.max_query_len, b.max_seq_len)
            out = torch.full(b.q.shape, float("nan"), dtype=t.dtype, device=t.device)
            got = tops.paged_attention(*args, out=out, config=cfg)
            assert got is out
            what = f"paged_attention bs={bs} d={d} g={g} {cfg}"
            assert_close(got, reference.paged_attention(*args), t.dtype, what)


def check_paged_attention_decodes(t: Target) -> None:
    """``num_decodes``: the leading one-token sequences go to the decode kernel, the rest to the
    prefill kernel, both into ``out``; against the reference, which ignores the hint. Covers
    decodes on block boundaries, a first token, every sequence a decode, and an fp8 cache."""

    gen = torch.Generator().manual_seed(4)
    for bs, d, g, hk in ATTN_SHAPES[:3]:
        chunks = [(2 * bs + 3, bs + 5), (2 * bs - 1, 2 * bs - 1), (17, 1), (9, 9)]
        decodes = [(bs, 1), (1, 1), (bs + 1, 1), (3 * bs + 2, 1)] + ([(2000, 1), (700, 1)] if t.big else [])
        for specs, n, kv in [(decodes + chunks, len(decodes), ""), (decodes, len(decodes), ""),
                             (decodes[:2] + chunks, 2, "fp8/head")]:
            b, scales = with_kv_cache(make_paged_batch(specs, hk, g, d, bs, t, gen), kv)
            args = (b.q, b.key_cache, b.value_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                    b.scale, b.max_query_len, b.max_seq_len)
            out = torch.full(b.q.shape, float("nan"), dtype=t.dtype, device=t.device)
            got = tops.paged_attention(*args, out=out, num_decodes=n, **scales)
            assert got is out
            what = f"paged_attention num_decodes={n} of {len(specs)} bs={bs} d={d} g={g} kv={kv or t.dtype}"
            ref = reference.paged_attention(*args, **scales)
            assert_close(got, ref, t.dtype, what)
            assert torch.equal(reference.paged_attention(*args, num_decodes=n, **scales), ref), what


def _split_specs(bs: int, big: bool) -> list[tuple[int, int]]:
    """Mixed batches for the split-KV path; lengths are not multiples of the block size."""
    specs = [
        (5 * bs + 3, 7),  # short chunk at the end of the longest context
        (3 * bs + 1, bs + 2),  # chunk over a shorter context (partitions past it unused)
        (2 * bs - 3, 2 * bs - 3),  # fresh prefill: early tiles fit one partition, later ones not
        (4 * bs + 5, 1),  # decodes: long context, first token, on a block boundary
        (1, 1),
        (bs, 1),
    ]
    if big:
        specs += [(5000, 40), (4500, 1), (700, 300)]  # the default thresholds split these
    return specs


# (block_size, head_dim, GQA group, KV heads, KV cache: "" | "fp8" per tensor | "fp8/head").
_SPLIT_SHAPES = [(8, 64, 1, 2, ""), (16, 64, 4, 2, "fp8/head"), (32, 64, 8, 1, ""), (16, 128, 8, 1, "fp8")]


def check_paged_attention_split(t: Target) -> None:
    """The split-KV path, forced by small thresholds, against the reference; run to run equal.

    On the GPU (``big``) the default config also runs on contexts long enough to split.
    """
    from kernels.triton_ops.prefill_attention import choose_tiles

    gen = torch.Generator().manual_seed(9)
    forced = [
        tops.PrefillConfig(block_n=16, split_kv=True, split_min_context=1, split_target_programs=1 << 20,
                           split_min_partition=16),
        tops.PrefillConfig(block_m=16, block_n=16, split_kv=True, split_min_context=1,
                           split_target_programs=1 << 20,
                           split_min_partition=32),
        tops.PrefillConfig(block_n=16, split_kv=True, split_min_context=1, split_target_programs=1 << 20,
                           split_min_partition=16, long_chunk_tiles=True),
    ]
    for i, (bs, d, g, hk, kv) in enumerate(_SPLIT_SHAPES):
        specs = _split_specs(bs, t.big)
        b, scales = with_kv_cache(make_paged_batch(specs, hk, g, d, bs, t, gen), kv)
        args = (b.q, b.key_cache, b.value_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                b.scale, b.max_query_len, b.max_seq_len)
        ref = reference.paged_attention(*args, **scales)
        cfg = forced[i % len(forced)]
        if t.big:  # partitions of 128+ keys: a few dozen over the 5,000-token context
            cfg = dataclasses.replace(cfg, split_min_partition=128)
        defaults = [tops.PrefillConfig(), tops.PrefillConfig(long_chunk_tiles=False)]
        configs = [cfg] + (defaults if t.big else [])
        for c in configs:
            what = f"paged_attention split bs={bs} d={d} g={g} kv={kv or t.dtype} {c}"
            tiles = choose_tiles(c, b.q.shape[0], len(specs), g, hk, b.max_seq_len, b.q.element_size(),
                                 b.max_query_len)
            assert tiles.num_splits > 1, f"{what}: the split path was not taken ({tiles})"
            out = torch.full(b.q.shape, float("nan"), dtype=t.dtype, device=t.device)
            got = tops.paged_attention(*args, out=out, config=c, **scales)
            assert got is out
            assert_close(got, ref, t.dtype, what)
            if t.big or i == 0:  # (the interpreter's runs are short of time, not of determinism)
                again = tops.paged_attention(*args, config=c, **scales)
                assert torch.equal(got, again), f"{what}: not the same output run to run"


def check_paged_decode_attention(t: Target) -> None:
    gen = torch.Generator().manual_seed(2)
    # heads_per_program 1 and several (block-diagonal query tiles; the default takes 2 at head
    # dim 64 where the KV heads divide), split and not; 4 is cut to a divisor of Hk.
    configs = [tops.DecodeConfig(), tops.DecodeConfig(partition_size=32, block_n=16),
               tops.DecodeConfig(partition_size=16, block_n=16, heads_per_program=1),
               tops.DecodeConfig(heads_per_program=4),
               tops.DecodeConfig(partition_size=32, block_n=16, heads_per_program=2)]
    for bs, d, g, hk in ATTN_SHAPES + [(16, 32, 2, 4)]:
        lens = [1, bs, bs + 1, 2 * bs + 3, 3 * bs, 7, 5 * bs - 1] + ([2048, 1500, 513] if t.big else [])
        for cfg in configs:
            # max_seq_len is an upper bound (as under CUDA graphs): partitions past the end stay unused.
            b = make_paged_batch([(n, 1) for n in lens], hk, g, d, bs, t, gen, seq_len_slack=37)
            args = (b.q, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, b.scale, b.max_seq_len)
            out = torch.full(b.q.shape, float("nan"), dtype=t.dtype, device=t.device)
            got = tops.paged_decode_attention(*args, out=out, config=cfg)
            assert got is out
            what = f"paged_decode_attention bs={bs} d={d} g={g} {cfg}"
            assert_close(got, reference.paged_decode_attention(*args), t.dtype, what)


@triton.jit
def _first_tile_lines_probe(k_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, stride_bt, stride_kb,
                            stride_ks, stride_kh, partition_size, HEADS: tl.constexpr, ROW: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, LINES: tl.constexpr):
    # As _decode_partition_kernel's grid: (sequence, KV-head program, partition); stores each
    # program's line offsets where they exist, -1 elsewhere.
    seq, kv_head, split = tl.program_id(0), tl.program_id(1) * HEADS, tl.program_id(2)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    off, ok = first_tile_lines(k_cache_ptr, bt_row, tl.load(seq_lens_ptr + seq), split * partition_size,
                               partition_size, kv_head, stride_kb, stride_ks, stride_kh, ROW, BLOCK_SIZE,
                               BLOCK_N)
    pid = (seq * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + split
    idx = tl.arange(0, BLOCK_N)[:, None] * LINES + tl.arange(0, LINES)[None, :]
    tl.store(out_ptr + pid * BLOCK_N * LINES + idx, tl.where(ok, off, -1))


def check_decode_prefetch_lines(t: Target) -> None:
    """The lines phase 1 prefetches before the PDL wait (``first_tile_lines``; the prefetch
    itself is PTX, run on the card): for every program, exactly the 128-byte lines of its first
    ``block_n`` keys' rows that exist (below the sequence length and the partition's end), each
    once, and nothing for partitions past the end."""
    gen = torch.Generator().manual_seed(5)
    elem = t.dtype.itemsize
    line = 128 // elem
    for bs, d, hk, heads, part, block_n in [(16, 128, 8, 1, 64, 64), (16, 64, 8, 2, 64, 32),
                                           (8, 32, 2, 1, 32, 16), (16, 16, 4, 4, 16, 16)]:
        lens = [1, bs, 2 * part + 3, 5 * part - 1, part]
        b = make_paged_batch([(n, 1) for n in lens], hk, 1, d, bs, t, gen, seq_len_slack=37)
        kc = b.key_cache
        row = heads * d
        lines = max(row // line, 1)
        splits = -(-b.max_seq_len // part)
        grid = (len(lens), hk // heads, splits)
        out = torch.empty(*grid, block_n, lines, dtype=torch.int64, device=t.device)
        _first_tile_lines_probe[grid](kc, b.block_tables, b.seq_lens, out, b.block_tables.stride(0),
                                      kc.stride(0), kc.stride(1), kc.stride(2), part, HEADS=heads, ROW=row,
                                      BLOCK_SIZE=bs, BLOCK_N=block_n, LINES=lines)
        table = b.block_tables.tolist()
        for s, n in enumerate(lens):
            for p in range(grid[1]):
                for split in range(splits):
                    start = split * part
                    keys = range(start, min(start + block_n, start + part, n))
                    want = sorted(table[s][k // bs] * kc.stride(0) + (k % bs) * kc.stride(1)
                                  + p * heads * kc.stride(2) + i * line for k in keys for i in range(lines))
                    got = sorted(v for v in out[s, p, split].flatten().tolist() if v >= 0)
                    what = f"first_tile_lines bs={bs} d={d} heads={heads} seq={s} len={n} program={p} " \
                           f"split={split}"
                    assert got == want, f"{what}: {got} != {want}"


def check_store_kvcache(t: Target) -> None:
    gen = torch.Generator().manual_seed(3)
    for bs, d, hk in [(8, 64, 1), (16, 128, 2), (64, 64, 8), (32, 128, 3)]:
        num_tokens, num_blocks = 37, 6
        kv = _randn(num_tokens, 2 * hk + 1, d, t=t, gen=gen)
        key, value = kv[:, :hk], kv[:, hk : 2 * hk]  # strided views, as from a fused projection
        slots = torch.randperm(num_blocks * bs, generator=gen)[:num_tokens]
        slots[torch.randperm(num_tokens, generator=gen)[:5]] = -1  # padding tokens
        slots = slots.to(device=t.device)
        k_cache = _randn(num_blocks, bs, hk, d, t=t, gen=gen)
        v_cache = _randn(num_blocks, bs, hk, d, t=t, gen=gen)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        tops.store_kvcache(key, value, k_cache, v_cache, slots)
        reference.store_kvcache(key, value, k_ref, v_ref, slots)
        # A pure copy: bit-exact, and untouched slots keep their old contents.
        assert torch.equal(k_cache, k_ref), f"store_kvcache key bs={bs} d={d} hk={hk}"
        assert torch.equal(v_cache, v_ref), f"store_kvcache value bs={bs} d={d} hk={hk}"


_NORM_SHAPES = [(13, 136), (2, 5, 256), (7, 1000)]


def check_rms_norm(t: Target) -> None:
    gen = torch.Generator().manual_seed(4)
    for shape in _NORM_SHAPES:
        x = _randn(*shape, t=t, gen=gen) * 3
        w = _randn(shape[-1], t=t, gen=gen)
        out = torch.full(x.shape, float("nan"), dtype=t.dtype, device=t.device)
        got = tops.rms_norm(x, w, 1e-6, out=out)
        assert got is out
        assert_close(got, reference.rms_norm(x, w, 1e-6), t.dtype, f"rms_norm {shape}", scale=4)
        fresh = tops.rms_norm(x, w, 1e-5)
        assert_close(fresh, reference.rms_norm(x, w, 1e-5), t.dtype, f"rms_norm {shape}", scale=4)


def check_fused_add_rms_norm(t: Target) -> None:
    gen = torch.Generator().manual_seed(5)
    for shape in _NORM_SHAPES:
        x = _randn(*shape, t=t, gen=gen)
        res = _randn(*shape, t=t, gen=gen) * 2
        w = _randn(shape[-1], t=t, gen=gen)
        ref_out, ref_sum = reference.fused_add_rms_norm(x, res, w, 1e-6)
        got_out, got_sum = tops.fused_add_rms_norm(x.clone(), res.clone(), w, 1e-6)
        assert_close(got_sum, ref_sum, t.dtype, f"fused_add_rms_norm sum {shape}", scale=4)
        assert_close(got_out, ref_out, t.dtype, f"fused_add_rms_norm out {shape}", scale=4)


def check_silu_and_mul(t: Target) -> None:
    gen = torch.Generator().manual_seed(6)
    for shape in [(7, 400), (3, 4, 128), (5, 3000)]:
        x = _randn(*shape, t=t, gen=gen) * 2
        out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=t.dtype, device=t.device)
        got = tops.silu_and_mul(x, out=out)
        assert got is out
        assert_close(got, reference.silu_and_mul(x), t.dtype, f"silu_and_mul {shape}", scale=4)


def check_argmax_rows(t: Target) -> None:
    """The greedy argmax against torch's: ties to the lowest index (inside a chunk and across
    chunks), a row of -inf, widths that are not a multiple of the chunk, the workspace reused
    (its counters back at zero after every call), and ``GreedyArgmax`` on both sides of its
    row limit."""
    from kernels.triton_ops.sampling import ArgmaxWorkspace, GreedyArgmax, argmax_rows

    gen = torch.Generator().manual_seed(11)
    for rows, vocab, block in [(5, 1000, 256), (3, 4096, 1024), (1, 777, 128), (9, 300, 512)]:
        ws = ArgmaxWorkspace.for_rows(16, vocab, t.device, block=block)
        for _ in range(2):
            x = _randn(rows, vocab, t=t, gen=gen)
            x[0, 3] = x[0, vocab - 2] = 50.0  # a tie across chunks
            x[-1, 1] = x[-1, 2] = 60.0  # a tie inside a chunk
            if rows > 2:
                x[1] = float("-inf")
            got = argmax_rows(x, ws)
            assert got.dtype == torch.int64 and got.shape == (rows,)
            want = x.argmax(dim=-1)
            assert torch.equal(got, want), f"argmax_rows {rows}x{vocab}: {got} != {want}"
            assert int(ws.counts.abs().sum()) == 0, "argmax_rows left a row counter set"
    greedy = GreedyArgmax(500, t.device, max_rows=4)
    for rows in (1, 4, 6):  # the kernel up to 4 rows, torch's argmax above
        x = _randn(rows, 500, t=t, gen=gen)
        assert torch.equal(greedy(x), x.argmax(dim=-1)), f"GreedyArgmax {rows} rows"
    try:
        argmax_rows(_randn(17, 500, t=t, gen=gen), ArgmaxWorkspace.for_rows(16, 500, t.device))
    except ValueError as exc:
        assert "up to 16 rows of 500 columns" in str(exc)
    else:
        raise AssertionError("argmax_rows took more rows than its workspace holds")


def check_rotary_embedding(t: Target) -> None:
    gen = torch.Generator().manual_seed(7)
    for d, hq, hk in [(64, 8, 2), (128, 4, 4), (128, 12, 3)]:
        num_tokens, max_pos = 11, 64
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(t.device)
        positions = torch.randint(0, max_pos, (num_tokens,), generator=gen).to(t.device)
        qkv = _randn(num_tokens, hq + 2 * hk, d, t=t, gen=gen)
        q, k = qkv[:, :hq], qkv[:, hq : hq + hk]  # strided views: rotated in place
        ref_q, ref_k = reference.rotary_embedding(positions, q, k, cache)
        got_q, got_k = tops.rotary_embedding(positions, q, k, cache)
        assert_close(got_q, ref_q, t.dtype, f"rotary q d={d}", scale=4)
        assert_close(got_k, ref_k, t.dtype, f"rotary k d={d}", scale=4)
        assert torch.equal(q, got_q) and torch.equal(k, got_k), "rotary must return its in-place results"


def assert_one_rounding_apart(out: torch.Tensor, ref: torch.Tensor, what: str, atol: float = 0.0) -> None:
    """bf16 outputs that both round the same float32 value: at most one bf16 ulp apart.

    Kernel and reference compute in float32 (agreeing to a few float32 ulps) and round once
    to bf16. Torch and the GPU round to nearest even, Triton's interpreter toward zero (its
    bias pushes the relative norm error to ~4e-3, past :func:`assert_close`'s bound), so the
    two bf16 results may land on neighbouring values, never further apart. ``atol``: the float32
    error of terms that may cancel (a sum near 0 has a bf16 ulp below its terms' float32 error).
    """
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    assert out.shape == ref.shape and out.dtype == ref.dtype == torch.bfloat16, what
    o, r = out.double(), ref.double()
    top = torch.maximum(o.abs(), r.abs()).clamp_min(2.0**-100)
    ulp = torch.exp2(torch.floor(torch.log2(top)) - 7)  # bf16: 7 explicit mantissa bits
    bad = (o - r).abs() > ulp + atol
    assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.numel()} elements more than one bf16 ulp off"


def _fused_qkv_views(
    num_tokens: int, hq: int, hk: int, d: int, t: Target, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v as the model makes them: reshaped column slices of one fused qkv projection."""
    qkv = _randn(num_tokens, (hq + 2 * hk) * d, t=t, gen=gen)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    return q.reshape(num_tokens, hq, d), k.reshape(num_tokens, hk, d), v.reshape(num_tokens, hk, d)


def _store_slots(num_tokens: int, block_size: int, num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct slots: a run across a block boundary, a block's first and last slots, padding.

    Needs ``num_blocks >= 4`` and enough blocks for ``num_tokens`` slots."""
    run = torch.arange(block_size - 3, block_size + 4)  # crosses from block 0 into block 1
    edges = torch.tensor([0, 2 * block_size, 3 * block_size - 1])
    rest = torch.randperm(num_blocks * block_size - 3 * block_size, generator=gen) + 3 * block_size
    slots = torch.cat((run, edges, rest))[:num_tokens]
    slots = slots[torch.randperm(num_tokens, generator=gen)]
    slots[torch.randperm(num_tokens, generator=gen)[: num_tokens // 4]] = -1  # padding tokens
    return slots


def check_rotary_store_kvcache(t: Target) -> None:
    """The fused op against the reference and, bit for bit, against the two Triton launches it replaces."""
    gen = torch.Generator().manual_seed(8)
    # (head_dim, KV heads, GQA group, block size, tokens): head dims 64/128, ratios 1/4/8.
    for d, hk, g, bs, num_tokens in [(64, 2, 1, 8, 37), (128, 2, 4, 16, 13), (64, 1, 8, 16, 1),
                                     (128, 3, 8, 8, 21), (64, 4, 4, 32, 9)]:
        what = f"rotary_store_kvcache d={d} hk={hk} g={g} bs={bs} T={num_tokens}"
        max_pos, num_blocks = 4096, -(-num_tokens // bs) + 4  # room for the slots _store_slots picks
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
        cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(t.device)
        positions = torch.randint(0, max_pos, (num_tokens,), generator=gen).to(t.device)
        slots = _store_slots(num_tokens, bs, num_blocks, gen).to(t.device)
        q, k, v = _fused_qkv_views(num_tokens, hk * g, hk, d, t, gen)
        k_in, v_in = k.clone(), v.clone()
        # Random old contents: slots not stored to must keep them.
        caches = [_randn(num_blocks, bs, hk, d, t=t, gen=gen) for _ in range(2)]
        ref_caches = [c.clone() for c in caches]
        ref_q = reference.rotary_store_kvcache(positions, q, k, v, cos_sin, *ref_caches, slots)
        two_q, two_k = tops.rotary_embedding(positions, q.clone(), k.clone(), cos_sin)
        two_caches = [c.clone() for c in caches]
        tops.store_kvcache(two_k, v, *two_caches, slots)

        got_q = tops.rotary_store_kvcache(positions, q, k, v, cos_sin, *caches, slots)
        assert got_q is q, f"{what}: q must be rotated in place and returned"
        assert torch.equal(k, k_in) and torch.equal(v, v_in), f"{what}: k/v must be left as they are"
        assert torch.equal(got_q, two_q), f"{what}: q differs from the rotary kernel's"
        assert torch.equal(caches[0], two_caches[0]), f"{what}: key cache differs from rotary + store"
        assert torch.equal(caches[1], ref_caches[1]), f"{what}: value cache (a pure copy)"
        for name, got, ref in [("q", got_q, ref_q), ("key cache", caches[0], ref_caches[0])]:
            if t.dtype == torch.bfloat16:
                assert_one_rounding_apart(got, ref, f"{what} {name}")
            else:
                assert_close(got, ref, t.dtype, f"{what} {name}", scale=4)



# Multi-LoRA: (tokens T, slots S, rank R, K or N, block_k or block_n: None for the default).
# K and N are not multiples of the blocks; R pads to 16 (8), fills it (16) or takes two shrink
# blocks (24); the small blocks make the kernels loop over K and tile N with a tail.
# (tokens, slots, rank columns, K or N, block); ranks past 64 take the expand kernel's rank loop
# (a fused q/k/v layer at rank 48 has 144 columns)
_LORA_SHAPES = [(0, 3, 8, 80, None), (1, 3, 16, 64, None), (5, 3, 8, 88, 32), (5, 3, 16, 72, 16),
                (7, 4, 24, 90, None), (3, 3, 144, 72, None)]
_LORA_BIG_SHAPES = [(64, 4, 16, 4096, None), (64, 8, 64, 4096, None), (33, 3, 8, 5000, None),
                    (200, 5, 32, 14336, None), (16, 3, 192, 4096, None)]


def _lora_slots(tokens: int, num_slots: int, gen: torch.Generator, t: Target) -> torch.Tensor:
    """Random slots with the first token on slot 0 (no adapter) and the last on the last slot;
    int32 for odd token counts, int64 for even ones (the ops take both)."""
    slots = torch.randint(0, num_slots, (tokens,), generator=gen)
    if tokens:
        slots[0], slots[-1] = 0, num_slots - 1
    return slots.to(device=t.device, dtype=torch.int32 if tokens % 2 else torch.int64)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal (``torch.equal`` takes -0.0 for 0.0)."""
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def check_lora_shrink(t: Target) -> None:
    """Per-token ``x @ a[slot].T`` in float32, rows of slot 0 exact zeros (written: ``out`` starts
    as NaN), x rows strided. bf16/fp16 products are exact in float32, so only the order of the
    sums differs from the reference: float32 tolerances in every dtype."""
    gen = torch.Generator().manual_seed(12)
    for tokens, num_slots, rank, k, block_k in _LORA_SHAPES + (_LORA_BIG_SHAPES if t.big else []):
        what = f"lora_shrink T={tokens} S={num_slots} R={rank} K={k} block_k={block_k}"
        x = _randn(tokens, k + 5, t=t, gen=gen)[:, :k]  # rows strided, as a column slice
        a = _randn(num_slots, rank, k, t=t, gen=gen) * k**-0.5
        a[0] = 0
        slots = _lora_slots(tokens, num_slots, gen, t)
        out = torch.full((tokens, rank), float("nan"), device=t.device)
        got = tops.lora_shrink(x, a, slots, out=out, block_k=block_k)
        assert got is out, what
        ref = reference.lora_shrink(x, a, slots)
        assert_close(got, ref, torch.float32, what)
        none = slots == 0
        assert _same_bits(got[none], torch.zeros_like(got[none])), f"{what}: slot-0 rows are not +0.0"
        assert_close(tops.lora_shrink(x, a, slots), ref, torch.float32, f"{what} (fresh output)")
        # K split over several programs (the small shapes' K fits one split by default)
        split = tops.lora_shrink(x, a, slots, out=torch.full_like(out, float("nan")), k_split=16, block_k=16)
        assert_close(split, ref, torch.float32, f"{what} (split K)")
        assert _same_bits(split[none], torch.zeros_like(split[none])), f"{what}: split slot-0 rows"


def check_lora_expand(t: Target) -> None:
    """In place ``y += scale * xa @ b[slot].T`` against the reference; tokens whose scale is 0
    (slot 0, and in a second round the last slot disabled) keep their y bit for bit, -0.0 too."""
    gen = torch.Generator().manual_seed(13)
    for tokens, num_slots, rank, n, block_n in _LORA_SHAPES + (_LORA_BIG_SHAPES if t.big else []):
        for disabled in (False, True):
            what = f"lora_expand T={tokens} S={num_slots} R={rank} N={n} block_n={block_n} off={disabled}"
            y = _randn(tokens, n, t=t, gen=gen)
            xa = torch.randn(tokens, rank, generator=gen).to(t.device)
            b = _randn(num_slots, n, rank, t=t, gen=gen) * rank**-0.5
            b[0] = 0
            scales = (torch.rand(num_slots, generator=gen) + 0.5).to(t.device)
            scales[0] = 0
            if disabled:
                scales[-1] = 0  # an adapter with weights but scale 0
            slots = _lora_slots(tokens, num_slots, gen, t)
            kept = scales.index_select(0, slots) == 0
            y[kept, 0] = -0.0  # y + 0.0 would give +0.0: a skipped token keeps the sign
            want = reference.lora_expand(y.clone(), xa, b, slots, scales)
            got_y = y.clone()
            got = tops.lora_expand(got_y, xa, b, slots, scales, block_n=block_n)
            assert got is got_y, f"{what}: not in place"
            assert _same_bits(got[kept], y[kept]), f"{what}: a token of scale 0 changed y"
            assert _same_bits(want[kept], y[kept]), f"{what}: the reference changed a token of scale 0"
            if t.dtype == torch.bfloat16:
                # y + scale * delta may cancel: float32 slack of terms of order 1 (R products).
                assert_one_rounding_apart(got, want, what, atol=1e-5)
            else:
                assert_close(got, want, t.dtype, what, scale=4)


# Mixture of experts: (tokens T, hidden H, intermediate I, experts E, top-k K, routing, block_m,
# block_n, block_k; None: the op's default). H 48 and I 24 are not multiples of any block; the
# small blocks make the products loop over H (3 steps of 16) and I, and tile the columns with a
# tail. Routing: "random" (a softmax router's top-k), "some" (only experts 0, 3 and 6 of 8 get
# pairs: the others none), "all" (expert 2 in every token's top-k: with K 1 it gets every token).
_MOE_SHAPES = [(0, 32, 24, 4, 2, "random", None, None, None), (1, 32, 24, 4, 1, "random", None, None, None),
               (1, 48, 64, 8, 2, "random", None, None, None), (5, 48, 24, 8, 2, "random", None, None, 16),
               (5, 32, 64, 4, 2, "random", 32, 16, 16), (37, 48, 64, 8, 2, "random", None, None, None),
               (37, 32, 24, 4, 1, "random", None, 16, 16), (37, 48, 24, 8, 2, "some", None, None, None),
               (37, 48, 64, 4, 1, "all", None, None, None), (37, 32, 24, 4, 2, "all", 64, None, None)]
_MOE_BIG_SHAPES = [(1, 2048, 768, 64, 8, "random", None, None, None),
                   (200, 1024, 512, 16, 4, "random", None, None, None),
                   (3000, 512, 352, 8, 2, "random", None, None, None),
                   (513, 4096, 1408, 8, 2, "some", None, None, None),
                   (700, 1000, 200, 4, 1, "all", None, None, None)]


def moe_routing(tokens: int, num_experts: int, top_k: int, routing: str,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights, topk_ids)`` as a softmax router gives them (``torch.topk``: distinct ids per
    token), float32 and int64 on the CPU; ``routing`` as in ``_MOE_SHAPES``."""
    logits = torch.randn(tokens, num_experts, generator=gen)
    if routing == "some":  # only experts 0, 3, 6, ... may be picked
        logits[:, torch.arange(num_experts) % 3 != 0] = float("-inf")
    elif routing == "all":  # expert 2 first in every token's top-k (the others keep real weights)
        logits[:, 2] = logits.amax(dim=-1) + 0.5
    return torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)


def check_fused_moe(t: Target) -> None:
    """The op against the reference. float32: the same float32 arithmetic in another order
    (:func:`assert_close`'s float32 bounds). 16-bit: the reference rounds to bf16/fp16 each linear's
    output, SiLU, the product, each expert's weighted term and each partial sum (about 7 roundings
    of half an ulp); the op rounds the SiLU-and-mul product and the final sum only (the partial
    sums are float32). So up to 4 ulps (3.2e-2 bf16, 4e-3 fp16) of absolute and relative slack and
    a relative norm error of 1e-2 (bf16) / 1.5e-3 (fp16) between them; and the op must be about as
    close to the float64 result as the reference (relative norm error at most twice the
    reference's: it is usually below it, but a one-token output of 32 values is noisy and the
    interpreter rounds the bf16 product toward zero, twice the error of the GPU's rounding)."""
    gen = torch.Generator().manual_seed(14)
    shapes = _MOE_SHAPES + (_MOE_BIG_SHAPES if t.big else [])
    for i, (tokens, hidden, inter, num_experts, top_k, routing, bm, bn, bk) in enumerate(shapes):
        what = (f"fused_moe T={tokens} H={hidden} I={inter} E={num_experts} K={top_k} {routing} "
                f"blocks={bm},{bn},{bk}")
        x = _randn(tokens, hidden + 3, t=t, gen=gen)[:, :hidden]  # rows strided, as a column slice
        w13 = _randn(num_experts, 2 * inter, hidden, t=t, gen=gen) * hidden**-0.5
        w2 = _randn(num_experts, hidden, inter, t=t, gen=gen) * inter**-0.5
        weights, ids = moe_routing(tokens, num_experts, top_k, routing, gen)
        weights = weights.to(t.device)
        ids = ids.to(device=t.device, dtype=torch.int32 if i % 2 else torch.int64)  # the op takes both
        got = tops.fused_moe(x, w13, w2, weights, ids, block_m=bm, block_n=bn, block_k=bk)
        ref = reference.fused_moe(x, w13, w2, weights, ids)
        if tokens == 0:
            assert got.shape == (0, hidden) and got.dtype == t.dtype, what
            continue
        scale = max(1.0, float(ref.abs().max()))
        if t.dtype == torch.float32:
            assert_close(got, ref, t.dtype, what, scale=scale)
            continue
        exact = reference.fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids)
        ulps = 4 * (2.0**-8 if t.dtype == torch.bfloat16 else 2.0**-11)
        assert not torch.isnan(got).any() and got.shape == ref.shape and got.dtype == ref.dtype, what
        err = (got.double() - ref.double()).abs()
        bad = err > ulps * (scale + ref.double().abs())
        assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.numel()} off, max err {float(err.max()):.3e}"
        norm_err = float((got.double() - ref.double()).norm() / ref.double().norm())
        bound = 1e-2 if t.dtype == torch.bfloat16 else 1.5e-3
        assert norm_err <= bound, f"{what}: relative norm error {norm_err:.3e} > {bound}"
        got_exact = float((got.double() - exact).norm() / exact.norm())
        ref_exact = float((ref.double() - exact).norm() / exact.norm())
        assert got_exact <= 2 * ref_exact, f"{what}: {got_exact:.3e} from float64, reference {ref_exact:.3e}"



# FP8 experts (W8A16), as _MOE_SHAPES: H 48 and I 24/40 are not multiples of the blocks; "some"
# leaves 5 of 8 experts without pairs (and 5 tokens over 8 experts with "random" leave some too).
_MOE_FP8_SHAPES = [(0, 32, 24, 4, 2, "random", None, None, None),
                   (1, 32, 24, 4, 1, "random", None, None, None),
                   (5, 48, 24, 8, 2, "random", None, None, 16),
                   (37, 48, 40, 8, 2, "some", None, 16, 16),
                   (37, 48, 24, 4, 2, "all", 32, None, None)]
_MOE_FP8_BIG_SHAPES = [(1, 2048, 768, 64, 8, "random", None, None, None),
                       (513, 4096, 1408, 8, 2, "some", None, None, None),
                       (700, 1000, 200, 4, 1, "all", None, None, None)]


def quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked experts ``[E, R, C]`` -> ``(e4m3 [E, R, C], float32 scales [E, R])``:
    :func:`kernels.quant_reference.quantize_fp8_rows` on each expert's ``[R, C]`` (one scale per
    row), as the MoE layer quantizes its experts while loading."""
    parts = [quantize_fp8_rows(expert) for expert in w]
    return torch.stack([q for q, _ in parts]), torch.stack([scale.squeeze(-1) for _, scale in parts])


@triton.jit
def _e4m3_decode_kernel(w_ptr, out_ptr, SOFT_FP8: tl.constexpr):
    codes = tl.arange(0, 256)
    tl.store(out_ptr + codes, e4m3_to(tl.load(w_ptr + codes), out_ptr.dtype.element_ty, SOFT_FP8))


def check_e4m3_decode(t: Target) -> None:
    """``moe.e4m3_to`` on all 256 e4m3 codes against torch's conversion, bit for bit (NaN codes:
    NaN, payload and sign free): the integer decode under the interpreter, the hardware one on a
    GPU. The interpreter's own conversion decodes 0x7F/0xFF as +-480."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(t.device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = torch.full((256,), 7.0, dtype=dtype, device=t.device)
        _e4m3_decode_kernel[(1,)](codes, out, SOFT_FP8=software_fp8(codes))
        want = codes.to(dtype)
        nan = want.isnan()
        assert torch.equal(out.isnan(), nan), f"e4m3 -> {dtype}: NaN at {torch.nonzero(out.isnan() != nan)}"
        assert _same_bits(out[~nan], want[~nan]), f"e4m3 -> {dtype}: {out[~nan]} != {want[~nan]}"


def fused_moe_fp8_runs(t: Target,
                       gen: torch.Generator) -> Iterator[tuple[str, bool, torch.Tensor, torch.Tensor]]:
    """``(what, big, op, reference)`` on fp8 experts for each shape of ``_MOE_FP8_SHAPES`` (and of
    ``_MOE_FP8_BIG_SHAPES`` with ``t.big``), operands drawn from ``gen``."""
    shapes = [(s, False) for s in _MOE_FP8_SHAPES]
    shapes += [(s, True) for s in (_MOE_FP8_BIG_SHAPES if t.big else [])]
    for i, ((tokens, hidden, inter, num_experts, top_k, routing, bm, bn, bk), big) in enumerate(shapes):
        what = (f"fused_moe fp8 T={tokens} H={hidden} I={inter} E={num_experts} K={top_k} {routing} "
                f"blocks={bm},{bn},{bk}")
        x = _randn(tokens, hidden + 3, t=t, gen=gen)[:, :hidden]  # rows strided
        w13, w13_scale = quantize_experts(torch.randn(num_experts, 2 * inter, hidden, generator=gen)
                                          * hidden**-0.5)
        w2, w2_scale = quantize_experts(torch.randn(num_experts, hidden, inter, generator=gen) * inter**-0.5)
        # Strided operands: w13 a slice of wider rows, w2_scale column-major.
        wide = torch.zeros(num_experts, 2 * inter, hidden + 5, dtype=w13.dtype)
        wide[:, :, :hidden] = w13
        w13 = wide.to(t.device)[:, :, :hidden]
        w2, w13_scale = w2.to(t.device), w13_scale.to(t.device)
        w2_scale = w2_scale.t().contiguous().to(t.device).t()
        weights, ids = moe_routing(tokens, num_experts, top_k, routing, gen)
        weights = weights.to(t.device)
        ids = ids.to(device=t.device, dtype=torch.int32 if i % 2 else torch.int64)
        got = tops.fused_moe(x, w13, w2, weights, ids, w13_scale, w2_scale,
                             block_m=bm, block_n=bn, block_k=bk)
        yield what, big, got, reference.fused_moe(x, w13, w2, weights, ids, w13_scale, w2_scale)


# Per-element bound of check_fused_moe_fp8, times ``scale + |ref|``, and the relative norm bound.
_MOE_FP8_TOLERANCE = {torch.float32: (2e-6, 2e-6), torch.bfloat16: (2.0**-6, 1.2e-2),
                      torch.float16: (2.0**-9, 5e-4)}


def check_fused_moe_fp8(t: Target) -> None:
    """FP8 experts (W8A16: e4m3 ``w13``/``w2``, float32 row scales) against the reference's fp8
    path, after :func:`check_e4m3_decode`. Both multiply the activation by the exact e4m3 values
    (products of 16-bit activations and e4m3 values are exact in float32; float32 activations
    round each product once, as the reference does), sum in float32 in another order, scale the
    sums by the rows' scales and round ``silu(gate) * up`` to ``x``'s dtype; the kernel's SiLU is
    ``g / (1 + exp(-g))``, torch's its own float32 formula.

    Per element ``|op - ref| <= tol * (scale + |ref|)`` (``scale``: the output's largest magnitude,
    at least 1), and a relative norm error bound (``_MOE_FP8_TOLERANCE``). float32: only float32
    rounding differs, tol 2e-6, norm 2e-6 (the small shapes under the interpreter, 15 seeds: at
    most 3.3e-7 and 4.6e-7); the big shapes (GPU) sum up to 4096 terms and get
    :func:`assert_close`'s float32 bounds, as :func:`check_fused_moe`. 16-bit: a sum that differs
    in its last float32 bit can round the intermediate the other way, and the interpreter rounds
    the intermediate toward zero where the reference (and the GPU) rounds to nearest, an error
    of up to 1 ulp on every term of the down product: tol 4 half-ulps (2^-6 bf16, 2^-9 fp16),
    norm 1.2e-2 (bf16) / 5e-4 (fp16). Measured under the interpreter, 15 seeds: bf16 at most
    5.5e-3 (1.6e-2 absolute at ``scale`` 2), norm 6.1e-3; fp16 at most 1.1e-4, norm 1.4e-5."""
    check_e4m3_decode(t)
    for what, big, got, ref in fused_moe_fp8_runs(t, torch.Generator().manual_seed(15)):
        assert got.shape == ref.shape and got.dtype == t.dtype, what
        if ref.numel() == 0:
            continue
        scale = max(1.0, float(ref.abs().max()))
        if big and t.dtype == torch.float32:
            assert_close(got, ref, t.dtype, what, scale=scale)
            continue
        assert not torch.isnan(got).any(), what
        tol, norm_bound = _MOE_FP8_TOLERANCE[t.dtype]
        err = (got.double() - ref.double()).abs()
        bad = err > tol * (scale + ref.double().abs())
        assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.numel()} off, max err {float(err.max()):.3e}"
        norm_err = float(err.norm() / ref.double().norm())
        assert norm_err <= norm_bound, f"{what}: relative norm error {norm_err:.3e} > {norm_bound}"


CHECKS: dict[str, Callable[[Target], None]] = {
    "store_kvcache": check_store_kvcache,
    "paged_attention": check_paged_attention,
    "paged_attention_split": check_paged_attention_split,
    "paged_attention_decodes": check_paged_attention_decodes,
    "paged_decode_attention": check_paged_decode_attention,
    "decode_prefetch_lines": check_decode_prefetch_lines,
    "rms_norm": check_rms_norm,
    "fused_add_rms_norm": check_fused_add_rms_norm,
    "silu_and_mul": check_silu_and_mul,
    "rotary_embedding": check_rotary_embedding,
    "rotary_store_kvcache": check_rotary_store_kvcache,
    "argmax_rows": check_argmax_rows,
    "lora_shrink": check_lora_shrink,
    "lora_expand": check_lora_expand,
    "fused_moe": check_fused_moe,
    "fused_moe_fp8": check_fused_moe_fp8,
}


def run_all(t: Target, names: list[str] | None = None) -> dict[str, str]:
    """Run the checks ``names`` (default: all); ``{name: "ok" | traceback}``."""
    results: dict[str, str] = {}
    for name in names or list(CHECKS):
        try:
            CHECKS[name](t)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent test, per check
            results[name] = traceback.format_exc()
    return results


if __name__ == "__main__":
    # python kernel_checks.py [DTYPE [CHECK ...]]: DTYPE a torch dtype name (default float32).
    dtype = getattr(torch, sys.argv[1]) if len(sys.argv) > 1 else torch.float32
    print(json.dumps(run_all(Target("cpu", dtype), sys.argv[2:] or None)))
