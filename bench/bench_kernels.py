"""Kernel micro-benchmarks on one CUDA GPU: Triton ops against their torch references.

- copy: a 1 GiB device-to-device copy, the bandwidth ceiling (bytes read + bytes written);
- decode attention at W1/W3's batch (256 sequences x 640 tokens, head dim 128 and 64, the grid
  sized for ``max_model_len`` as under CUDA graphs): the default and the best of a sweep that
  includes KV heads per program (``--only-batch-decode`` runs this part alone);
- decode attention at batch 64, 2k-token contexts, llama3-8b shape (32 q heads, 8 KV heads,
  head dim 128, bf16, block size 16): achieved bandwidth (K/V bytes read) as a share of the
  copy bandwidth, the default tiling and a sweep of tilings;
- prefill attention at W6's ITL shapes (a 224/480-token chunk at the end of a 32k context,
  alone and beside 32 decodes; an 8,192-token chunk): the split-KV path on and off
  (``--prefill-split-kv on|off|both``), and a sweep of its ``split_target_programs``;
- prefill attention (fresh, with a cached prefix, mixed with decodes) and the norms,
  activation and rotary ops (also rotary + K/V store: two launches, and fused in one, at 4096
  tokens and at one decode token): time and ratio against the reference.

- W1/W3's prompt steps (16 fresh 512-token prompts beside 0-240 decodes): one launch against the
  decodes on the decode kernel (``num_decodes``), and a prefill tiling sweep
  (``--only-prompt-steps`` runs this part and the prefill cases at head dims 128 and 64).

Times are medians of ``triton.testing.do_bench`` (CUDA events) after a warm-up; the attention
rows of the decode, prefill and prompt-step parts replay the op from a CUDA graph
(:func:`graph_bench`: device time, as the engine runs them; launched from Python, a short kernel
measures its wrapper's host work).
``python bench/bench_kernels.py [--json PATH] [--no-sweep] [--prefill-split-kv on|off|both]
[--only-batch-decode] [--only-prompt-steps]``; prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import triton
import triton.testing
from bench_quant_kernels import copy_bandwidth_gb_s  # bench/ is on sys.path when run as a script

from kernels import reference
from kernels import triton_ops as tops
from kernels.triton_ops.prefill_attention import choose_tiles

LLAMA3_8B = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "hidden": 4096, "intermediate": 14336}


@dataclass(frozen=True)
class Row:
    """One measurement."""

    name: str
    ms: float
    gb_s: float | None = None
    share_of_copy: float | None = None
    ref_ms: float | None = None
    note: str = ""

    @property
    def speedup(self) -> float | None:
        return None if self.ref_ms is None else self.ref_ms / self.ms


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (CUDA events)."""
    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def graph_bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph of back-to-back calls: the
    device's time alone. :func:`bench` launches from Python, and a kernel shorter than its
    wrapper's host work (the attention ops' checks and launch, 50-100 us on the H200's host)
    measures the host instead: the engine runs these kernels inside CUDA graphs, or queued
    behind a step's long GEMMs."""
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


@dataclass(frozen=True)
class Paged:
    """A paged batch in the llama3-8b shape over shuffled blocks."""

    q: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    max_query_len: int
    max_seq_len: int
    scale: float


def make_paged(specs: list[tuple[int, int]], block_size: int = 16, head_dim: int | None = None) -> Paged:
    hq, hk, d = LLAMA3_8B["num_heads"], LLAMA3_8B["num_kv_heads"], head_dim or LLAMA3_8B["head_dim"]
    max_seq_len = max(s for s, _ in specs)
    per_seq = -(-max_seq_len // block_size)
    num_blocks = per_seq * len(specs)
    ids = list(range(num_blocks))
    random.Random(0).shuffle(ids)
    cache = (num_blocks, block_size, hk, d)
    starts = [0]
    for _, ql in specs:
        starts.append(starts[-1] + ql)
    return Paged(
        q=torch.randn(starts[-1], hq, d, device="cuda", dtype=torch.bfloat16),
        key_cache=torch.randn(cache, device="cuda", dtype=torch.bfloat16),
        value_cache=torch.randn(cache, device="cuda", dtype=torch.bfloat16),
        block_tables=torch.tensor(ids, dtype=torch.int32, device="cuda").view(len(specs), per_seq),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor([s for s, _ in specs], dtype=torch.int32, device="cuda"),
        max_query_len=max(ql for _, ql in specs),
        max_seq_len=max_seq_len,
        scale=d**-0.5,
    )


def decode_rows(copy_gb_s: float, sweep: bool, block_size: int) -> list[Row]:
    batch, ctx = 64, 2048
    p = make_paged([(ctx, 1)] * batch, block_size)
    kv_bytes = 2 * batch * ctx * p.key_cache.shape[2] * p.key_cache.shape[3] * 2
    args = (p.q, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, p.scale, p.max_seq_len)

    def row(name: str, cfg: tops.DecodeConfig, ref_ms: float | None = None) -> Row:
        ms = bench(lambda: tops.paged_decode_attention(*args, config=cfg))
        gb_s = kv_bytes / ms / 1e6
        return Row(name, ms, gb_s, gb_s / copy_gb_s, ref_ms, str(cfg) if name.startswith("sweep") else "")

    ref_ms = bench(lambda: reference.paged_decode_attention(*args)) if block_size == 16 else None
    rows = [row(f"decode b64 ctx2k bs{block_size} (default)", tops.DecodeConfig(), ref_ms)]
    if not sweep:
        return rows
    swept = [
        row("sweep decode", tops.DecodeConfig(part, block_n, warps, stages))
        for part in (1024, 2048)
        for block_n in (32, 64, 128)
        for warps, stages in ((2, 3), (4, 3), (2, 4))
    ]
    return rows + sorted(swept, key=lambda r: r.ms)[:4]


def batch_decode_rows(copy_gb_s: float, sweep: bool = True) -> list[Row]:
    """W1/W3's decode attention: 256 sequences at 640-token contexts (the middle of their
    decode), the grid sized for ``max_model_len`` 2,048 as under their CUDA graphs; head dim
    128 (llama3-8b) and 64 (llama3-1b); the default tiling and the best five of a sweep (KV
    heads per program, keys per step, warps, stages)."""
    rows = []
    for head_dim in (128, 64):
        p = make_paged([(640, 1)] * 256, 16, head_dim)
        kv_bytes = 2 * 256 * 640 * p.key_cache.shape[2] * head_dim * 2
        args = (p.q, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, p.scale, 2048)

        def row(name: str, cfg: tops.DecodeConfig, args: tuple = args, kv_bytes: int = kv_bytes) -> Row:
            ms = graph_bench(functools.partial(tops.paged_decode_attention, *args, config=cfg))
            gb_s = kv_bytes / ms / 1e6
            return Row(name, ms, gb_s, gb_s / copy_gb_s, note=str(cfg))

        name = f"decode b256 ctx640 d{head_dim}"
        swept = [
            row(f"{name} sweep", tops.DecodeConfig(part, block_n, warps, stages, heads))
            for part in (None, 256)
            for heads in ((2, 4) if head_dim < 128 else (1, 2))
            for block_n in (32, 64)
            for warps in (2, 4)
            for stages in ((2, 3, 4) if head_dim < 128 else (2, 3))
            if sweep and (part is None or part % block_n == 0)
        ]
        rows += [row(f"{name} (default)", tops.DecodeConfig())] + sorted(swept, key=lambda r: r.ms)[:8]
    return rows


def w2_decode_rows(copy_gb_s: float) -> list[Row]:
    """W2's decode attention: one sequence at a 640-token context (the middle of its decode),
    the grid sized for bench_gpu's ``max_model_len`` 2,048 as under its CUDA graphs, llama3-8b's
    heads; launched with PDL as the engine does. The default (256-token partitions: 3 live of 8)
    and shorter partitions, fewer keys per step and more programs, for a batch of one whose
    attention is a chain of dependent loads rather than a stream (every tiling, sorted)."""
    p = make_paged([(640, 1)])
    kv_bytes = 2 * 640 * p.key_cache.shape[2] * p.key_cache.shape[3] * 2
    args = (p.q, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, p.scale, 2048)

    def row(name: str, cfg: tops.DecodeConfig) -> Row:
        ms = graph_bench(functools.partial(tops.paged_decode_attention, *args, config=cfg, pdl=True))
        gb_s = kv_bytes / ms / 1e6
        return Row(name, ms, gb_s, gb_s / copy_gb_s, note=str(cfg))

    swept = [
        row("decode b1 ctx640 sweep", tops.DecodeConfig(part, block_n, warps, 3, heads))
        for part in (64, 128, 256)
        for block_n in (16, 32, 64)
        for warps in (2, 4)
        for heads in (1, 2)
        if part % block_n == 0
    ]
    return [row("decode b1 ctx640 (default)", tops.DecodeConfig())] + sorted(swept, key=lambda r: r.ms)


def w2_decode_chain_rows(copy_gb_s: float, layers: int = 32, rounds: int = 3) -> list[Row]:
    """W2's attention as a decode step runs it: ``layers`` layers of rotary + KV store then the
    decode attention (1 x 640 tokens, the grid sized for 2,048), each layer its own cache (84 MB
    for 32: more than L2 holds, so a layer's keys come from DRAM), every launch with PDL, in one
    CUDA graph; rotary's early inputs (``early_inputs``) and phase 1's L2 prefetch
    (``DecodeConfig.prefetch``), both before the PDL wait, off and on, alternating ``rounds``
    times. Rows: milliseconds per layer of the pair."""
    hq, hk, d = LLAMA3_8B["num_heads"], LLAMA3_8B["num_kv_heads"], LLAMA3_8B["head_dim"]
    ctx, block = 640, 16
    pages = [make_paged([(ctx, 1)], block) for _ in range(layers)]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device="cuda") / d))
    freqs = torch.outer(torch.arange(4096, dtype=torch.float32, device="cuda"), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.tensor([ctx - 1], device="cuda")
    k = torch.randn(1, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hk, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, hq, d, device="cuda", dtype=torch.bfloat16)
    slots = [(p.block_tables[0, (ctx - 1) // block] * block + (ctx - 1) % block).view(1).long()
             for p in pages]
    kv_bytes = 2 * ctx * hk * d * 2

    def step(early: bool, prefetch: bool) -> None:
        cfg = tops.DecodeConfig(prefetch=prefetch)
        for p, slot in zip(pages, slots, strict=True):
            tops.rotary_store_kvcache(positions, p.q, k, v, cos_sin, p.key_cache, p.value_cache, slot,
                                      pdl=True, early_inputs=early)
            tops.paged_decode_attention(p.q, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, p.scale,
                                        2048, out=out, pdl=True, config=cfg)

    rows = []
    on = {True: "on", False: "off"}
    for _ in range(rounds):
        for early, prefetch in ((False, False), (True, False), (False, True), (True, True)):
            us = graph_bench(functools.partial(step, early, prefetch)) * 1e3 / layers
            gb_s = kv_bytes / us / 1e3
            rows.append(Row(f"w2 rotary+decode x{layers} early {on[early]} prefetch {on[prefetch]}", us / 1e3,
                            gb_s, gb_s / copy_gb_s, note="ms per layer"))
    return rows


def split_decode_rows(copy_gb_s: float) -> list[Row]:
    """Few sequences, long contexts: the split-KV path (8 x 8 KV heads, 16k tokens)."""
    batch, ctx = 8, 16384
    p = make_paged([(ctx, 1)] * batch)
    kv_bytes = 2 * batch * ctx * p.key_cache.shape[2] * p.key_cache.shape[3] * 2
    args = (p.q, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, p.scale, p.max_seq_len)
    rows = []
    for cfg in (tops.DecodeConfig(), tops.DecodeConfig(partition_size=512), tops.DecodeConfig(num_warps=4)):
        ms = bench(functools.partial(tops.paged_decode_attention, *args, config=cfg))
        gb_s = kv_bytes / ms / 1e6
        rows.append(Row("decode b8 ctx16k (split-KV)", ms, gb_s, gb_s / copy_gb_s, note=str(cfg)))
    return rows


def prefill_rows(sweep: bool, head_dim: int = 128) -> list[Row]:
    """Prefill attention cases at llama3-8b's heads, head dim ``head_dim`` (128: llama3-8b;
    64: llama3-1b's), the default tiling and a sweep; and the unpaged SDPA peer."""
    cases = {
        "prefill 8x1024 fresh": [(1024, 1024)] * 8,
        "prefill 16x256 after 1792 cached": [(2048, 256)] * 16,
        "mixed 1x512 chunk + 63 decodes@2k": [(512, 512)] + [(2048, 1)] * 63,
    }
    rows = []
    for name, specs in cases.items():
        p = make_paged(specs, 16, head_dim)
        name = f"{name} d{head_dim}"
        args = (p.q, p.key_cache, p.value_cache, p.block_tables, p.query_start_loc, p.seq_lens,
                p.scale, p.max_query_len, p.max_seq_len)
        ref_ms = bench(functools.partial(reference.paged_attention, *args))
        # Causal FLOPs: each query row attends to its visible keys (QK^T and PV: 4*D per pair).
        pairs = sum(sum(s - ql + i + 1 for i in range(ql)) for s, ql in specs)
        flop = 4 * pairs * head_dim * LLAMA3_8B["num_heads"]
        configs = [tops.PrefillConfig()]
        if sweep:
            configs += [tops.PrefillConfig(bm, bn, w, st) for bm, bn, w, st in
                        ((64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3),
                         (128, 32, 4, 3), (64, 32, 4, 3), (64, 32, 4, 2), (128, 32, 4, 2),
                         (128, 128, 8, 2))]
        for i, cfg in enumerate(configs):
            ms = graph_bench(functools.partial(tops.paged_attention, *args, config=cfg))
            tiles = f"{cfg.block_m}/{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
            label = name if i == 0 else f"  sweep {tiles}"
            rows.append(Row(label, ms, ref_ms=ref_ms, note=f"{flop / ms / 1e9:.0f} TFLOP/s"))
    # Peer: torch SDPA (flash) on the same fresh prefill, contiguous and unpaged.
    q = torch.randn(8, 32, 1024, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(8, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    sdpa_ms = graph_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, k, is_causal=True, enable_gqa=True))
    rows.append(Row("torch SDPA 8x1024 causal (unpaged peer)", sdpa_ms))
    return rows


def prompt_step_rows(sweep: bool) -> list[Row]:
    """W1/W3's prompt steps: 16 fresh 512-token prompts beside the decodes of the requests the
    earlier prompt steps admitted (0, 128 and 240 decodes at 520-token contexts), head dim 64
    (llama3-1b) and 128 (llama3-8b). The whole step in one launch of the prefill kernel at 64
    keys per step (the engine before DECISIONS 122), against ``paged_attention`` with
    ``num_decodes`` (the decodes on the decode kernel, the prompts on the prefill kernel at the
    default tiles, 32 keys per step at these contexts); the decodes alone; and a tiling sweep of
    the prompts alone. TFLOP/s count the prompts' causal pairs only."""
    rows = []
    for head_dim in (64, 128):
        for decodes in (0, 128, 240):
            specs = [(520, 1)] * decodes + [(512, 512)] * 16
            p = make_paged(specs, 16, head_dim)
            flop = 4 * 16 * (512 * 513 // 2) * head_dim * LLAMA3_8B["num_heads"]
            whole = (p.q, p.key_cache, p.value_cache, p.block_tables, p.query_start_loc, p.seq_lens,
                     p.scale, p.max_query_len, p.max_seq_len)
            name = f"prompt step d{head_dim} 16x512 + {decodes} dec"
            one = functools.partial(tops.paged_attention, *whole, config=tops.PrefillConfig(block_n=64))
            ms = graph_bench(one)
            rows.append(Row(f"{name}, one launch, 64 keys", ms, note=f"{flop / ms / 1e9:.0f} TFLOP/s"))
            ms = graph_bench(functools.partial(tops.paged_attention, *whole, num_decodes=decodes))
            rows.append(Row(f"{name}, num_decodes (default)", ms, note=f"{flop / ms / 1e9:.0f} TFLOP/s"))
            if decodes:
                ms = graph_bench(functools.partial(tops.paged_decode_attention, p.q[:decodes], p.key_cache,
                                                   p.value_cache, p.block_tables[:decodes],
                                                   p.seq_lens[:decodes], p.scale, 520))
                rows.append(Row(f"{name}, the decodes alone", ms))
            if not sweep or decodes:  # the sweep runs on the prompts alone
                continue
            swept = []
            for bm in (64, 128):
                for bn in (32, 64, 128):
                    for warps in (4, 8):
                        for stages in (2, 3):
                            cfg = tops.PrefillConfig(bm, bn, warps, stages)
                            try:
                                fn = functools.partial(tops.paged_attention, *whole, config=cfg)
                                ms = graph_bench(fn)
                            except Exception as exc:  # out of shared memory or registers
                                print(f"skip {cfg}: {type(exc).__name__}", flush=True)
                                continue
                            swept.append(Row(f"  sweep {bm}/{bn} w{warps} s{stages}", ms,
                                             note=f"{flop / ms / 1e9:.0f} TFLOP/s"))
            rows += sorted(swept, key=lambda r: r.ms)[:6]
    return rows


def long_prefill_rows(split_modes: list[bool], sweep: bool) -> list[Row]:
    """W6's ITL shapes: a short chunk at the end of a 32k context, alone and beside 32 decodes
    (``PrefillConfig.split_kv`` on and/or off; the sweep varies ``split_target_programs``)."""
    cases = {
        "chunk 224 @32k": [(32768, 224)],
        "chunk 480 @32k": [(32768, 480)],
        "chunk 224 @32k + 32 decodes@300": [(32768, 224)] + [(300, 1)] * 32,
        "chunk 480 @32k + 32 decodes@300": [(32768, 480)] + [(300, 1)] * 32,
        "chunk 8192 @32k (W6 prefill step)": [(32768, 8192)],
    }
    group, kv_heads = LLAMA3_8B["num_heads"] // LLAMA3_8B["num_kv_heads"], LLAMA3_8B["num_kv_heads"]
    rows = []
    for name, specs in cases.items():
        p = make_paged(specs)
        args = (p.q, p.key_cache, p.value_cache, p.block_tables, p.query_start_loc, p.seq_lens,
                p.scale, p.max_query_len, p.max_seq_len)
        configs = [(f"split {'on' if on else 'off'}", tops.PrefillConfig(split_kv=on)) for on in split_modes]
        if sweep and True in split_modes:
            configs += [(f"  sweep target {n}", tops.PrefillConfig(split_target_programs=n))
                        for n in (256, 512, 2048, 4096)]
        for label, cfg in configs:
            tiles = choose_tiles(cfg, p.q.shape[0], len(specs), group, kv_heads, p.max_seq_len, 2)
            ms = bench(functools.partial(tops.paged_attention, *args, config=cfg))
            note = f"block_m {tiles.block_m}, {tiles.num_splits} x {tiles.partition or p.max_seq_len} keys"
            rows.append(Row(f"{name}, {label}" if not label.startswith(" ") else label, ms, note=note))
    return rows


def elementwise_rows(copy_gb_s: float) -> list[Row]:
    tokens, hidden, inter = 4096, LLAMA3_8B["hidden"], LLAMA3_8B["intermediate"]
    hq, hk, d = LLAMA3_8B["num_heads"], LLAMA3_8B["num_kv_heads"], LLAMA3_8B["head_dim"]

    def bf16(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    x, res, w = bf16(tokens, hidden), bf16(tokens, hidden), bf16(hidden)
    gate_up = bf16(tokens, 2 * inter)
    qkv = bf16(tokens, hq + 2 * hk, d)
    q, k = qkv[:, :hq], qkv[:, hq : hq + hk]
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    cache = torch.randn(8192, d, device="cuda")
    row_bytes = tokens * hidden * 2
    v = qkv[:, hq + hk :]
    kv_cache = bf16(2, tokens // 16, 16, hk, d)  # block size 16
    slots = torch.randperm(tokens, device="cuda")

    def on_tokens(n: int, fn: Callable[..., object]) -> Callable[[], object]:
        """``fn`` with the rotary_store_kvcache arguments of the first ``n`` tokens."""
        args = (pos[:n], q[:n], k[:n], v[:n], cache, kv_cache[0], kv_cache[1], slots[:n])
        return lambda: fn(*args)

    def two_launches(p: torch.Tensor, q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor,
                     cos_sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, s: torch.Tensor) -> None:
        tops.rotary_embedding(p, q_, k_, cos_sin)
        tops.store_kvcache(k_, v_, kc, vc, s)

    cases: list[tuple[str, Callable[[], object], Callable[[], object], int]] = [
        ("rms_norm 4096x4096", lambda: tops.rms_norm(x, w, 1e-5), lambda: reference.rms_norm(x, w, 1e-5),
         2 * row_bytes),
        # In place: repeated calls keep growing the residual slowly; timing is unaffected.
        ("fused_add_rms_norm 4096x4096", lambda: tops.fused_add_rms_norm(x, res, w, 1e-5),
         lambda: reference.fused_add_rms_norm(x, res, w, 1e-5), 4 * row_bytes),
        ("silu_and_mul 4096x14336", lambda: tops.silu_and_mul(gate_up),
         lambda: reference.silu_and_mul(gate_up), 3 * tokens * inter * 2),
        ("rotary 4096 tok 32+8 heads", lambda: tops.rotary_embedding(pos, q, k, cache),
         lambda: reference.rotary_embedding(pos, q, k, cache), 2 * tokens * (hq + hk) * d * 2),
    ]
    # Rotary + K/V store as two launches and as one, at a prefill's 4096 tokens and at one decode
    # token (launch-bound). Bytes per token: q read + written, k and v read, k and v written.
    for n in (tokens, 1):
        ref, nbytes = on_tokens(n, reference.rotary_store_kvcache), n * (2 * hq + 4 * hk) * d * 2
        for name, op in (("rotary + store_kvcache, 2 launches", two_launches),
                         ("rotary_store_kvcache fused", tops.rotary_store_kvcache)):
            cases.append((f"{name}, {n} tok", on_tokens(n, op), ref, nbytes))
    rows = []
    for name, fn, ref_fn, nbytes in cases:
        ms = bench(fn)
        gb_s = nbytes / ms / 1e6
        rows.append(Row(name, ms, gb_s, gb_s / copy_gb_s, bench(ref_fn)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows and context here")
    parser.add_argument("--no-sweep", action="store_true", help="skip the decode tiling sweep")
    parser.add_argument("--prefill-split-kv", choices=("on", "off", "both"), default="both",
                        help="long-context prefill rows with PrefillConfig.split_kv on, off or both")
    parser.add_argument("--only-batch-decode", action="store_true",
                        help="only W1/W3's decode attention (256 x 640 tokens) and its tiling sweep")
    parser.add_argument("--only-w2-decode", action="store_true",
                        help="only W2's decode attention (1 x 640 tokens): 32 layers with rotary + KV "
                             "store, early reads off and on, then (unless --no-sweep) its tiling sweep")
    parser.add_argument("--only-prompt-steps", action="store_true",
                        help="only W1/W3's prompt steps (16 x 512 fresh tokens beside decodes) and (unless "
                             "--no-sweep) the prefill cases at head dim 128 and 64, swept")
    args = parser.parse_args()
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    copy = copy_bandwidth_gb_s()
    rows = [Row("copy 1 GiB d2d", 0.0, copy, 1.0)]
    if args.only_w2_decode:
        rows += w2_decode_chain_rows(copy)
        _report(args.json, card, rows + ([] if args.no_sweep else w2_decode_rows(copy)))
        return
    if args.only_prompt_steps:
        rows += prompt_step_rows(not args.no_sweep)
        if not args.no_sweep:
            rows += prefill_rows(True, 128) + prefill_rows(True, 64)
        _report(args.json, card, rows)
        return
    rows += batch_decode_rows(copy, not (args.no_sweep and args.only_batch_decode))
    if args.only_batch_decode:
        _report(args.json, card, rows)
        return
    rows += decode_rows(copy, not args.no_sweep, 16)
    rows += decode_rows(copy, False, 64)
    rows += split_decode_rows(copy)
    rows += prefill_rows(not args.no_sweep)
    split_modes = {"on": [True], "off": [False], "both": [False, True]}[args.prefill_split_kv]
    rows += long_prefill_rows(split_modes, not args.no_sweep)
    rows += elementwise_rows(copy)
    _report(args.json, card, rows)


def _report(json_path: str | None, card: str, rows: list[Row]) -> None:
    """Write the rows (``json_path``) and print them as a table."""
    context = {"date": datetime.date.today().isoformat(), "card": card, "torch": torch.__version__,
               "triton": triton.__version__}
    if json_path:
        with open(json_path, "w") as f:
            json.dump({**context, "rows": [{**asdict(r), "speedup": r.speedup} for r in rows]}, f, indent=1)
    print(json.dumps(context))
    print(f"{'name':<44} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'ref ms':>9} {'x ref':>7}  note")
    for r in rows:
        gb = f"{r.gb_s:8.0f}" if r.gb_s else " " * 8
        share = f"{100 * r.share_of_copy:5.1f}%" if r.share_of_copy else " " * 6
        ref = f"{r.ref_ms:9.3f}" if r.ref_ms else " " * 9
        speed = f"{r.speedup:6.1f}x" if r.speedup else " " * 7
        print(f"{r.name:<44} {r.ms:9.4f} {gb} {share} {ref} {speed}  {r.note}")


if __name__ == "__main__":
    main()
