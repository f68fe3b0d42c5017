"""One-token GEMVs on one CUDA GPU (``kernels/triton_ops/gemv.py``), the way decode reads them.

    PYTHONPATH=. python bench/bench_gemv.py [--parts bf16,fp8,w4,fp8_70b,fp8_small_m] [--json rows.jsonl]

Per projection shape, a chain of distinct layers (32 of llama3-8b, 6 of llama3-70b: more bytes
than L2 holds) is captured in one CUDA graph and timed by replays (median of 10): kernels run
back to back as in a decode step, and no layer's weight is in L2 when it is read. Bytes are the
weights' (plus scales); the share is of a 1 GiB device-to-device copy measured first.

- ``bf16``: cuBLAS ``F.linear`` and a sweep of ``gemv16`` tilings;
- ``fp8``: the per-token quantization alone, ``torch._scaled_mm`` on a pre-quantized activation,
  a sweep of ``gemv_fp8`` tilings;
- ``w4``: ``gemv_wna16`` (4-bit, groups of 128, float16 scales) through the int32-word kernel
  (the default), swept, against the byte kernel (factored) at its measured tiling;
- ``w4_bytes``: the byte kernel, factored and not, swept (the earlier sweep);
- ``fp8_70b``: the fp8 sweep on the llama3-70b projections;
- ``fp8_small_m``: 1-16 tokens, quantization + ``gemv_fp8`` (default tiles) against quantization +
  ``_scaled_mm``: where ``Fp8LinearConfig.gemv_max_m`` belongs;
- ``gated``: llama3-8b's gate_up then SiLU-and-mul, two launches against one (``gated=True``), in
  bf16 (cuBLAS, and ``gemv16`` at five tilings), fp8 weight-only and 4-bit words;
- ``pdl``: 32 llama3-8b decoder layers (norms and GEMVs) in bf16, fp8 and 4-bit with
  programmatic dependent launch off and on, alternating rounds (:func:`bench_pdl`);
- ``linear16``: the one-token bf16 linears as the engine runs them (``gemv16_linear``), against
  cuBLAS, per projection and over 32 decoder layers (:func:`bench_linear16`);
- ``w4_ptx``: the 4-bit word kernel with its nibbles decoded in inline PTX (the CUDA default)
  against the Triton-op decode the interpreter runs, at ``W4_PTX_TILES`` (:func:`bench_w4_ptx`);
- ``linear_fp8``: the one-token fp8 weight-only GEMV swept per projection (whole-row tiles among
  them), gated, and over 32 decoder layers (:func:`bench_linear_fp8`);
- ``w4mma``: the tensor-core 4-bit GEMV (``wna16_mma``) against the word kernel's packed bf16
  decode, per projection over ``MMA_SWEEP``, over 32 decoder layers with PDL, and at 2-8 tokens
  against ``wna16_linear``'s CUDA-core GEMV (:func:`bench_w4_mma`);
- ``w4gemm``: the 4-bit GEMM at 16, 64 and 256 tokens, tilings with and without split-K, against
  bf16 cuBLAS (:func:`bench_w4_gemm`);
- ``w4_split``: the one-token 4-bit GEMV with ``xload`` at more and smaller programs and
  split-K per projection, its sums added by a second launch or by the last program
  (``fixup``) (:func:`bench_w4_split`);
- ``fp8_block``: block-wise fp8 (128 x 128) against per-channel fp8 and bf16 at 1, 16, 256 and
  2,048 tokens, as the engine calls them (:func:`bench_fp8_block`);
- ``w4_act``: the one-token 4-bit linears of qkv, o and gate_up with and without act-order's
  input ``index_select`` (:func:`bench_w4_act`);
- ``small_m``: asymmetric 4-bit and 8-bit weights at 1-16 tokens: the default dispatch, and the
  one-token GEMV per token (``WnA16Config.gemv_token_loop``), the multi-token GEMV and the GEMM
  (:func:`bench_small_m_formats`).

Sweep: ``block_n`` 4/8/16 x ``block_k`` 512/1024 x 4/8 warps, plus (4, 1024, 2), (2, 1024, 2),
(32, 256, 4); each with split-K 1, 2, 4 (``w4``: also (32, 1024, 8), (32, 512, 8), (16, 2048, 8),
(8, 2048, 4); split-K 1 only); ``--tiles`` and ``--splits`` replace the bf16 / fp8 lists. Prints
the best tiling per shape and one summary line per format (microseconds per layer).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_quant_kernels import copy_bandwidth_gb_s  # bench/ is on sys.path when run as a script

from kernels import quant_reference as qref
from kernels.triton_ops import fp8_matmul, wna16
from kernels.triton_ops import gemv as G
from kernels.triton_ops.activation import silu_and_mul
from kernels.triton_ops.norm import fused_add_rms_norm
from kernels.triton_ops.wna16 import GEMV_M1_TILES, WnA16Config, wna16_linear
from kernels.triton_ops.wna16_mma import MmaTiles, gemv_int4_mma, mma_tiles

DEV = "cuda"
SHAPES_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
SHAPES_70B = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}
TILES = [(bn, bk, w) for bn in (4, 8, 16) for bk in (512, 1024) for w in (4, 8)]
TILES += [(4, 1024, 2), (2, 1024, 2), (32, 256, 4)]
SPLITS = (1, 2, 4)
W4_TILES = TILES + [(32, 1024, 8), (32, 512, 8), (16, 2048, 8), (8, 2048, 4)]
W4_BYTES_TILES = G.GemvTiles(16, 1024, 4, 1)  # the byte kernel's measured best (docs/QUANTIZATION.md)


def time_chain(fn: Callable[[], object], reps: int = 10) -> float:
    """Milliseconds per replay of ``fn`` captured in a CUDA graph (median of ``reps``)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]


def chain(call: Callable[..., object], items: Sequence[tuple[Any, ...]]) -> Callable[[], list[object]]:
    """A function that runs ``call(*item)`` for every item (one per layer), in order."""
    return lambda: [call(*item) for item in items]


def _scaled_mm(xq: torch.Tensor, xs: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.view(1, -1), out_dtype=torch.bfloat16)


class Recorder:
    """Rows ``{format, shape, variant, us_per_layer, gb_s, share_of_copy}``."""

    def __init__(self, copy: float) -> None:
        self.copy = copy
        self.rows: list[dict[str, Any]] = []

    def add(self, fmt: str, shape: str, variant: str, ms: float, layer_bytes: int,
            layers: int) -> dict[str, Any]:
        gb_s = layer_bytes * layers / ms / 1e6
        row = dict(format=fmt, shape=shape, variant=variant, us_per_layer=ms / layers * 1e3, gb_s=gb_s,
                   share_of_copy=gb_s / self.copy)
        self.rows.append(row)
        return row

    def sweep(self, fmt: str, shape: str, layer_bytes: int, layers: int,
              make: Callable[[G.GemvTiles], Callable[[], object]],
              tiles_list: Sequence[tuple[int, int, int]] = TILES,
              splits: Sequence[int] = SPLITS) -> dict[str, Any]:
        best: dict[str, Any] | None = None
        for bn, bk, warps in tiles_list:
            for split in splits:
                tiles = G.GemvTiles(bn, bk, warps, split)
                ms = time_chain(make(tiles))
                row = self.add(fmt, shape, f"{bn},{bk},{warps},{split}", ms, layer_bytes, layers)
                if best is None or row["us_per_layer"] < best["us_per_layer"]:
                    best = row
        assert best is not None
        print(f"best {fmt} {shape}: tiles {best['variant']} {best['us_per_layer']:.1f} us "
              f"({best['share_of_copy']:.0%})", flush=True)
        return best


def fp8_layers(n: int, k: int, layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(layers):
        q, s = qref.quantize_fp8_rows(torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02)
        out.append((q, s.reshape(-1).contiguous()))
    return out


def w4_layers(n: int, k: int, layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random 4-bit ``[n, k]`` weights (packed bytes, symmetric, groups of 128, float16 scales)."""
    return [(torch.randint(0, 256, (n, k // 2), device=DEV, dtype=torch.uint8),
             (torch.rand(n, k // 128, device=DEV) * 0.02 + 0.001).half()) for _ in range(layers)]


def w4_nbytes(n: int, k: int) -> int:
    """Bytes of one :func:`w4_layers` weight: the nibbles and the scales."""
    return n * k // 2 + n * (k // 128) * 2


def _gemv16_chain(x: torch.Tensor, ws: list[tuple[torch.Tensor]], tiles: G.GemvTiles) -> Callable[[], object]:
    return chain(partial(G.gemv16, x, tiles=tiles), ws)


def _gemv_fp8_chain(xq: torch.Tensor, xs: torch.Tensor, wq: list[tuple[torch.Tensor, torch.Tensor]],
                    tiles: G.GemvTiles) -> Callable[[], object]:
    def one(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return G.gemv_fp8(xq, xs, q, s, None, torch.bfloat16, tiles=tiles)
    return chain(one, wq)


def _fp8_weight_only_chain(x: torch.Tensor, wq: list[tuple[torch.Tensor, torch.Tensor]], gated: bool,
                           tiles: G.GemvTiles) -> Callable[[], object]:
    return chain(partial(G.gemv_fp8_weight_only, x, tiles=tiles, gated=gated), wq)


def _gemv_w4_chain(x: torch.Tensor, w4: list[tuple[torch.Tensor, torch.Tensor]], factored: bool,
                   words: bool, tiles: G.GemvTiles) -> Callable[[], object]:
    def one(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return G.gemv_wna16(x, q, s, None, 4, 128, tiles=tiles, factored=factored, words=words)
    return chain(one, w4)


# Tilings of the gated sweep (block_n, block_k, warps; one split).
GATED_TILES = [(8, 512, 4), (16, 512, 4), (8, 1024, 4), (4, 1024, 2), (16, 1024, 8), (4, 2048, 4),
               (8, 2048, 8), (16, 2048, 8)]


def bench_gated(rec: Recorder) -> None:
    """llama3-8b's gate_up (32 layers) then SiLU-and-mul, as two launches and as one (``gated``:
    the activation in the GEMV's epilogue): bf16 (cuBLAS and gemv16), fp8 weight-only, 4-bit words."""
    n, k = SHAPES_8B["gate_up"]
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    ws = [(torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02,) for _ in range(32)]

    def two(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda *w: silu_and_mul(fn(*w))

    cublas = chain(two(partial(F.linear, x)), ws)
    rec.add("gated_bf16", "gate_up", "cublas+silu", time_chain(cublas), n * k * 2, 32)
    for t in GATED_TILES:
        tiles = G.GemvTiles(*t, 1)
        name = ",".join(map(str, t))
        rec.add("gated_bf16", "gate_up", f"gemv16 {name}+silu",
                time_chain(chain(two(partial(G.gemv16, x, tiles=tiles)), ws)), n * k * 2, 32)
        rec.add("gated_bf16", "gate_up", f"gemv16 {name} gated",
                time_chain(chain(partial(G.gemv16, x, tiles=tiles, gated=True), ws)), n * k * 2, 32)
    del ws
    wq = fp8_layers(n, k, 32)
    fp8 = partial(G.gemv_fp8_weight_only, x, tiles=G.FP8_M1_TILES)
    rec.add("gated_fp8", "gate_up", "weight_only+silu", time_chain(chain(two(fp8), wq)), n * k, 32)
    for t in ((2, 1024, 2), *GATED_TILES):
        fused = chain(partial(G.gemv_fp8_weight_only, x, tiles=G.GemvTiles(*t, 1), gated=True), wq)
        name = f"weight_only {','.join(map(str, t))} gated"
        rec.add("gated_fp8", "gate_up", name, time_chain(fused), n * k, 32)
    del wq
    w4 = w4_layers(n, k, 32)
    nbytes = w4_nbytes(n, k)

    def w4_one(q: torch.Tensor, s: torch.Tensor, tiles: G.GemvTiles = GEMV_M1_TILES,
               gated: bool = False) -> torch.Tensor:
        return G.gemv_wna16(x, q, s, None, 4, 128, tiles=tiles, gated=gated)

    rec.add("gated_w4", "gate_up", "words+silu", time_chain(chain(two(w4_one), w4)), nbytes, 32)
    for t in ((8, 2048, 4), (16, 1024, 4), (16, 2048, 8), (8, 1024, 4)):
        fused = chain(partial(w4_one, tiles=G.GemvTiles(*t, 1), gated=True), w4)
        rec.add("gated_w4", "gate_up", f"words {','.join(map(str, t))} gated", time_chain(fused), nbytes, 32)
    for row in rec.rows:
        if row["format"].startswith("gated"):
            us, share = row["us_per_layer"], row["share_of_copy"]
            print(f"{row['format']} {row['variant']}: {us:.1f} us ({share:.0%})", flush=True)
    torch.cuda.empty_cache()


GATED16_SWEEP = [(8, 1024, 4), (2, 4096, 4), (2, 4096, 8), (4, 4096, 8), (2, 2048, 4), (4, 2048, 4)]


def decoder_chain(layers_w: list[dict[str, Any]], linear: Callable[[torch.Tensor, Any], torch.Tensor],
                  gate_up: Callable[[torch.Tensor, Any], torch.Tensor],
                  norm_pdl: bool = False) -> Callable[[], torch.Tensor]:
    """One token through ``layers_w``'s decoder layers (llama3-8b's projections, attention left
    out) as the engine chains them: fused add + RMSNorm, qkv, o, fused add + RMSNorm, gate_up with
    SiLU-and-mul (``gate_up(h, w)``), down; ``linear(h, w)`` runs qkv, o and down. ``norm_pdl``:
    the norms launch with programmatic dependent launch."""
    hidden = SHAPES_8B["o"][0]
    norm_w = torch.ones(hidden, device=DEV, dtype=torch.bfloat16)
    x0 = torch.randn(1, hidden, device=DEV, dtype=torch.bfloat16)

    def run() -> torch.Tensor:
        h, res = x0.clone(), x0.clone()
        for w in layers_w:
            h, res = fused_add_rms_norm(h, res, norm_w, 1e-5, pdl=norm_pdl)
            qkv = linear(h, w["qkv"])
            h = linear(qkv[:, :hidden], w["o"])
            h, res = fused_add_rms_norm(h, res, norm_w, 1e-5, pdl=norm_pdl)
            h = gate_up(h, w["gate_up"])
            h = linear(h, w["down"])
        return h
    return run


def bench_linear16(rec: Recorder) -> None:
    """The one-token 16-bit linears as the engine runs them (bf16, llama3-8b): per projection (and
    the LM head, 4 copies) cuBLAS against ``gemv16_linear`` at :func:`~G.linear16_tiles`; gate_up
    with SiLU-and-mul at the tilings of ``GATED16_SWEEP``; then 32 decoder layers' norms and
    projections chained as the engine chains them (fused add + RMSNorm, qkv, o, fused add +
    RMSNorm, gated gate_up, down; attention left out), cuBLAS or ``gemv16_linear`` for qkv/o/down."""
    shapes = {**SHAPES_8B, "lm_head": (128256, 4096)}
    for shape, (n, k) in shapes.items():
        layers = 4 if shape == "lm_head" else 32
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        ws = [(torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02,) for _ in range(layers)]
        runs = {"cublas": chain(partial(F.linear, x), ws), "gemv16": chain(partial(G.gemv16_linear, x), ws)}
        line = []
        for name, fn in runs.items():
            row = rec.add("linear16", shape, name, time_chain(fn), n * k * 2, layers)
            line.append(f"{name} {row['us_per_layer']:.1f} us ({row['share_of_copy']:.0%})")
        print(f"linear16 {shape} {G.linear16_tiles(k)}: " + ", ".join(line), flush=True)
        if shape == "gate_up":
            for t in GATED16_SWEEP:
                fn = chain(partial(G.gemv16, x, tiles=G.GemvTiles(*t, 1), gated=True), ws)
                name = ",".join(map(str, t))
                row = rec.add("linear16_gated", shape, name, time_chain(fn), n * k * 2, layers)
                us, share = row["us_per_layer"], row["share_of_copy"]
                print(f"linear16 gate_up gated {name}: {us:.1f} us ({share:.0%})", flush=True)
        ws.clear()
        torch.cuda.empty_cache()
    layers_w = [{name: torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
                 for name, (n, k) in SHAPES_8B.items()} for _ in range(32)]
    nbytes = sum(n * k * 2 for n, k in SHAPES_8B.values())
    variants = {"cublas": decoder_chain(layers_w, F.linear, G.gemv16_gated_linear),
                "gemv16": decoder_chain(layers_w, G.gemv16_linear, G.gemv16_gated_linear)}
    for name, run_step in variants.items():
        row = rec.add("linear16_layers", "decoder", name, time_chain(run_step), nbytes, 32)
        us, share = row["us_per_layer"], row["share_of_copy"]
        print(f"linear16 layers {name}: {us:.1f} us per layer ({share:.0%} of copy)", flush=True)
    layers_w.clear()
    torch.cuda.empty_cache()


def bench_format(rec: Recorder, part: str, tiles_list: Sequence[tuple[int, int, int]] = TILES,
                 splits: Sequence[int] = SPLITS) -> None:
    """One format's projections: its baselines, then the sweep of ``tiles_list`` x ``splits``
    (the 4-bit parts sweep their own lists)."""
    shapes, layers = (SHAPES_70B, 6) if part == "fp8_70b" else (SHAPES_8B, 32)
    fmt = "fp8" if part.startswith("fp8") else ("w4" if part.startswith("w4") else part)
    for shape, (n, k) in shapes.items():
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        if fmt == "bf16":
            ws = [(torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02,) for _ in range(layers)]
            rec.add(fmt, shape, "cublas", time_chain(chain(partial(F.linear, x), ws)), n * k * 2, layers)
            rec.sweep(fmt, shape, n * k * 2, layers, partial(_gemv16_chain, x, ws), tiles_list, splits)
        elif fmt == "fp8":
            wq = fp8_layers(n, k, layers)
            quant = chain(partial(fp8_matmul.quantize_fp8_per_token, x), [()] * layers)
            rec.add(fmt, shape, "quantize", time_chain(quant), n * k, layers)
            xq, xs = fp8_matmul.quantize_fp8_per_token(x)
            rec.add(fmt, shape, "scaled_mm_prequantized", time_chain(chain(partial(_scaled_mm, xq, xs), wq)),
                    n * k, layers)
            rec.sweep(fmt, shape, n * k, layers, partial(_gemv_fp8_chain, xq, xs, wq), tiles_list, splits)
        else:  # w4
            w4 = w4_layers(n, k, layers)
            nbytes = w4_nbytes(n, k)
            if part == "w4":
                rec.sweep("w4_words", shape, nbytes, layers, partial(_gemv_w4_chain, x, w4, True, True),
                          tiles_list=W4_TILES, splits=(1,))
                bytes_ms = time_chain(_gemv_w4_chain(x, w4, True, False, W4_BYTES_TILES))
                rec.add("w4_bytes_factored", shape, "16,1024,4,1", bytes_ms, nbytes, layers)
            else:
                for factored in (True, False):
                    rec.sweep(f"w4_bytes_{'factored' if factored else 'per_weight'}", shape, nbytes, layers,
                              partial(_gemv_w4_chain, x, w4, factored, False))
        torch.cuda.empty_cache()


# One-token fp8 weight-only tilings (block_n, block_k, warps; one split): the two defaults
# (``fp8_tiles``: FP8_M1_TILES, FP8_M1_FEW_ROWS_TILES), the loop tilings of the earlier sweeps,
# then tiles of whole rows (up to 4,096 inputs, straight-line loads) and of 2,048.
FP8_WO_TILES = [(4, 1024, 2), (4, 2048, 4), (2, 1024, 2), (2, 2048, 2), (8, 2048, 4), (8, 1024, 4),
                (2, 1024, 1), (4, 1024, 4), (1, 4096, 2), (2, 4096, 4), (4, 4096, 8), (8, 2048, 8)]
FP8_WO_GATED_TILES = [(4, 1024, 2), (4, 2048, 4), (2, 1024, 2), (2, 2048, 2), (8, 2048, 4), (2, 4096, 4),
                      (8, 4096, 8)]


def bench_linear_fp8(rec: Recorder) -> None:
    """fp8 weight-only at one token as the engine runs it (llama3-8b, 32 layers per chain): per
    projection the sweep of ``FP8_WO_TILES`` (the two defaults first); gate_up with
    SiLU-and-mul in one launch at ``FP8_WO_GATED_TILES``; then 32 decoder layers
    (:func:`decoder_chain`) at the default tiling, gate_up in two launches and gated."""
    for shape, (n, k) in SHAPES_8B.items():
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        wq = fp8_layers(n, k, 32)
        rec.sweep("fp8_wo", shape, n * k, 32, partial(_fp8_weight_only_chain, x, wq, False),
                  FP8_WO_TILES, (1,))
        if shape == "gate_up":
            rec.sweep("fp8_wo_gated", shape, n * k, 32, partial(_fp8_weight_only_chain, x, wq, True),
                      FP8_WO_GATED_TILES, (1,))
        del wq
        torch.cuda.empty_cache()
    layers_w = [{name: fp8_layers(n, k, 1)[0] for name, (n, k) in SHAPES_8B.items()} for _ in range(32)]
    nbytes = sum(n * k for n, k in SHAPES_8B.values())

    def linear(h: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return G.gemv_fp8_weight_only(h, *w)

    def gated(h: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return G.gemv_fp8_weight_only(h, *w, gated=True)

    variants = {"two launches": decoder_chain(layers_w, linear, lambda h, w: silu_and_mul(linear(h, w))),
                "gated gate_up": decoder_chain(layers_w, linear, gated)}
    for name, run_step in variants.items():
        row = rec.add("fp8_wo_layers", "decoder", name, time_chain(run_step), nbytes, 32)
        us, share = row["us_per_layer"], row["share_of_copy"]
        print(f"fp8_wo layers {name}: {us:.1f} us per layer ({share:.0%} of copy)", flush=True)
    layers_w.clear()
    torch.cuda.empty_cache()


def _block_layers(n: int, k: int, layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random fp8 ``[n, k]`` weights with 128 x 128 block scales (a DeepSeek-style checkpoint's)."""
    return [qref.quantize_fp8_blocks(torch.randn(n, k, device=DEV) * 0.02, FP8_BLOCK) for _ in range(layers)]


FP8_BLOCK = (128, 128)
FP8_BLOCK_MS = (1, 16, 256, 2048)


def bench_fp8_block(rec: Recorder) -> None:
    """Block-wise fp8 against per-channel fp8 and bf16 cuBLAS on llama3-8b's projections, as the
    engine calls them: one token weight-only (the GEMV; 32 layers per chain), 16 / 256 / 2,048
    tokens W8A8 (block: per-token-group quantization + the Triton block GEMM; per channel:
    per-token quantization + ``torch._scaled_mm``; 8 layers per chain)."""
    from kernels.triton_ops import fp8_block

    for shape, (n, k) in SHAPES_8B.items():
        for m in FP8_BLOCK_MS:
            layers = 32 if m == 1 else 8
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            channel = fp8_layers(n, k, layers)
            block = _block_layers(n, k, layers)
            if m == 1:
                block_gemv = partial(fp8_block.fp8_block_weight_only_linear, block=FP8_BLOCK)
                variants = {
                    "channel": chain(partial(G.gemv_fp8_weight_only, x), channel),
                    "block": chain(partial(block_gemv, x), block),
                }
            else:
                dense = [(torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02,) for _ in range(layers)]
                variants = {
                    "bf16 cublas": chain(partial(F.linear, x), dense),
                    "channel": chain(partial(fp8_matmul.fp8_linear, x), channel),
                    "block": chain(partial(fp8_block.fp8_block_linear, x, block=FP8_BLOCK), block),
                }
            for name, fn in variants.items():
                row = rec.add("fp8_block", f"{shape} m={m}", name, time_chain(fn), n * k, layers)
                print(f"fp8_block {shape} m={m} {name}: {row['us_per_layer']:.1f} us per layer "
                      f"({row['share_of_copy']:.0%} of copy for the fp8 bytes)", flush=True)
            del channel, block, variants
            torch.cuda.empty_cache()


def _pdl_layers(fmt: str) -> tuple[list[dict[str, Any]], int, Callable[..., torch.Tensor]]:
    """32 llama3-8b layers of ``fmt`` (bf16, fp8, w4), their weight bytes per layer, and
    ``apply(h, w, gated, pdl)``: the engine's one-token linear for that format."""
    def make(n: int, k: int) -> Any:
        if fmt == "bf16":
            return torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
        if fmt == "fp8":
            return fp8_layers(n, k, 1)[0]
        return w4_layers(n, k, 1)[0]

    def apply(h: torch.Tensor, w: Any, gated: bool, pdl: bool) -> torch.Tensor:
        if fmt == "bf16":
            return (G.gemv16_gated_linear if gated else G.gemv16_linear)(h, w, pdl=pdl)
        if fmt == "fp8":
            return G.gemv_fp8_weight_only(h, *w, gated=gated, pdl=pdl)
        return G.gemv_wna16(h, *w, None, 4, 128, tiles=GEMV_M1_TILES, gated=gated, pdl=pdl, pairs=True)

    nbytes = sum(w4_nbytes(n, k) if fmt == "w4" else n * k * (2 if fmt == "bf16" else 1)
                 for n, k in SHAPES_8B.values())
    return [{name: make(n, k) for name, (n, k) in SHAPES_8B.items()} for _ in range(32)], nbytes, apply


def bench_pdl(rec: Recorder, rounds: int = 3) -> None:
    """Programmatic dependent launch over 32 llama3-8b decoder layers (:func:`decoder_chain`:
    norms and one-token GEMVs, attention left out), bf16 / fp8 weight-only / 4-bit words, PDL off
    and on in alternating rounds; fp8 also with PDL on the GEMVs only and on the norms only
    (DECISIONS 134)."""
    for fmt in ("bf16", "fp8", "w4"):
        layers_w, nbytes, apply = _pdl_layers(fmt)
        variants = {"off": (False, False), "on": (True, True)}
        if fmt == "fp8":
            variants |= {"gemv only": (True, False), "norms only": (False, True)}
        for _ in range(rounds):
            for name, (gemv_pdl, norm_pdl) in variants.items():
                run = decoder_chain(layers_w, partial(apply, gated=False, pdl=gemv_pdl),
                                    partial(apply, gated=True, pdl=gemv_pdl), norm_pdl)
                row = rec.add(f"pdl_{fmt}", "decoder", name, time_chain(run, reps=20), nbytes, 32)
                print(f"pdl {fmt} {name}: {row['us_per_layer']:.2f} us per layer "
                      f"({row['share_of_copy']:.0%} of copy)", flush=True)
        layers_w.clear()
        torch.cuda.empty_cache()


W4_PTX_TILES = [(8, 2048, 4), (4, 1024, 2), (8, 1024, 4), (16, 1024, 4), (16, 2048, 8), (32, 512, 8),
                (4, 2048, 4), (8, 4096, 8), (16, 512, 4)]


def bench_w4_ptx(rec: Recorder) -> None:
    """The word kernel's two nibble decodes (``nibble_asm``) at each of ``W4_PTX_TILES``."""
    for shape, (n, k) in SHAPES_8B.items():
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        w4 = w4_layers(n, k, 32)
        nbytes = w4_nbytes(n, k)
        for bn, bk, warps in W4_PTX_TILES:
            for asm in (False, True):
                tiles = G.GemvTiles(bn, bk, warps, 1)
                call = partial(_w4_decode, x, tiles, asm)
                rec.add(f"w4_words_{'ptx' if asm else 'triton'}_decode", shape, f"{bn},{bk},{warps},1",
                        time_chain(chain(call, w4)), nbytes, 32)
        del w4
        torch.cuda.empty_cache()


def _w4_decode(x: torch.Tensor, tiles: G.GemvTiles, asm: bool, q: torch.Tensor,
               s: torch.Tensor) -> torch.Tensor:
    return G.gemv_wna16(x, q, s, None, 4, 128, tiles=tiles, nibble_asm=asm)


def bench_small_m(rec: Recorder) -> None:
    configs = {"gemv": fp8_matmul.Fp8LinearConfig(gemv_max_m=16),
               "scaled_mm": fp8_matmul.Fp8LinearConfig(gemv_max_m=0)}
    for m in (1, 2, 4, 8, 16):
        total = dict.fromkeys(configs, 0.0)
        for shape, (n, k) in SHAPES_8B.items():
            wq = fp8_layers(n, k, 16)
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            for name, cfg in configs.items():
                ms = time_chain(chain(partial(_fp8_linear, x, cfg), wq))
                total[name] += rec.add("fp8", shape, f"M={m} quantize+{name}", ms, n * k, 16)["us_per_layer"]
        print(f"fp8 M={m}: quantize+gemv {total['gemv']:.1f} us/layer, quantize+_scaled_mm "
              f"{total['scaled_mm']:.1f} us/layer", flush=True)


def _fp8_linear(x: torch.Tensor, cfg: fp8_matmul.Fp8LinearConfig, q: torch.Tensor,
                s: torch.Tensor) -> torch.Tensor:
    return fp8_matmul.fp8_linear(x, q, s, config=cfg)


MMA_SWEEP = [(warps, bpi) for warps in (2, 4, 8) for bpi in (1, 2, 4)]


def _w4_words(x: torch.Tensor, gated: bool, q: torch.Tensor, s: torch.Tensor,
              pdl: bool = False, peel: bool = False) -> torch.Tensor:
    return G.gemv_wna16(x, q, s, None, 4, 128, tiles=GEMV_M1_TILES, gated=gated, pairs=True, pdl=pdl,
                        peel=peel)


def _w4_mma(x: torch.Tensor, tiles: MmaTiles | None, gated: bool, q: torch.Tensor, s: torch.Tensor,
            pdl: bool = False) -> torch.Tensor:
    return gemv_int4_mma(x, q, s, 128, gated=gated, tiles=tiles, pdl=pdl)


def _mma_variant(tiles: MmaTiles) -> str:
    return (f"mma {tiles.warps},{tiles.blocks_per_iter},{'sub_mma' if tiles.sub_mma else 'sub_fma'},"
            f"{'prefetch' if tiles.prefetch else 'no_prefetch'}")


def bench_w4_mma(rec: Recorder, rounds: int = 3) -> None:
    """The tensor-core 4-bit GEMV against the word kernel with the packed bf16 decode (the
    one-token default): per llama3-8b projection (gate_up gated, as the engine runs it) at each of
    ``MMA_SWEEP`` (warps, blocks per iteration; then the best with the FMA subtract and without the
    peeled first iteration); 32 decoder layers (:func:`decoder_chain`, PDL on) in alternating
    rounds, the word kernel also with its first tile peeled (``gemv_wna16(peel=True)``); then 2, 4
    and 8 tokens against ``wna16_linear``'s CUDA-core GEMV.
    Each shape's first layer is also compared with the torch reference (error printed)."""
    for shape, (n, k) in SHAPES_8B.items():
        gated = shape == "gate_up"
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        w4 = w4_layers(n, k, 32)
        nbytes = w4_nbytes(n, k)
        ref = qref.wna16_linear(x, w4[0][0], w4[0][1], None, 4, 128).float()
        err = float((gemv_int4_mma(x, *w4[0], 128).float() - ref).abs().max() / ref.abs().max())
        ms = time_chain(chain(partial(_w4_words, x, gated), w4))
        words = rec.add("w4_mma", shape, "words", ms, nbytes, 32)
        best: dict[str, Any] | None = None
        best_tiles = MmaTiles()
        for warps, bpi in MMA_SWEEP:
            tiles = MmaTiles(warps, bpi)
            ms = time_chain(chain(partial(_w4_mma, x, tiles, gated), w4))
            row = rec.add("w4_mma", shape, _mma_variant(tiles), ms, nbytes, 32)
            if best is None or row["us_per_layer"] < best["us_per_layer"]:
                best, best_tiles = row, tiles
        # The best tiling with the FMA subtract, and without the peeled first iteration.
        for tiles in (replace(best_tiles, sub_mma=False), replace(best_tiles, prefetch=False)):
            ms = time_chain(chain(partial(_w4_mma, x, tiles, gated), w4))
            row = rec.add("w4_mma", shape, _mma_variant(tiles), ms, nbytes, 32)
            if row["us_per_layer"] < best["us_per_layer"]:
                best = row
        assert best is not None
        print(f"w4 {shape}{' gated' if gated else ''}: words {words['us_per_layer']:.1f} us, "
              f"best {best['variant']} {best['us_per_layer']:.1f} us ({best['share_of_copy']:.0%} of copy; "
              f"default {mma_tiles(n, k)}); max error / max |ref| {err:.1e}", flush=True)
        del w4
        torch.cuda.empty_cache()
    layers_w, nbytes, _ = _pdl_layers("w4")
    for _ in range(rounds):
        for name in ("words", "words peeled", "mma"):
            def linear(h: torch.Tensor, w: Any, gated: bool, name: str = name) -> torch.Tensor:
                if name.startswith("words"):
                    return _w4_words(h, gated, w[0], w[1], pdl=True, peel=name == "words peeled")
                return _w4_mma(h, None, gated, w[0], w[1], pdl=True)
            run = decoder_chain(layers_w, partial(linear, gated=False), partial(linear, gated=True),
                                norm_pdl=True)
            row = rec.add("w4_mma_decoder", "decoder", name, time_chain(run, reps=20), nbytes, 32)
            print(f"w4 decoder {name}: {row['us_per_layer']:.2f} us per layer "
                  f"({row['share_of_copy']:.0%} of copy)", flush=True)
    layers_w.clear()
    torch.cuda.empty_cache()
    for m in (2, 4, 8):
        total = {"gemv": 0.0, "mma": 0.0}
        for shape, (n, k) in SHAPES_8B.items():
            w4 = w4_layers(n, k, 16)
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            for name, call in (("gemv", partial(_w4_small_m, x)), ("mma", partial(_w4_mma, x, None, False))):
                ms = time_chain(chain(call, w4))
                row = rec.add("w4_mma", shape, f"M={m} {name}", ms, w4_nbytes(n, k), 16)
                total[name] += row["us_per_layer"]
            del w4
        print(f"w4 M={m}: CUDA-core gemv {total['gemv']:.1f} us/layer, mma {total['mma']:.1f} us/layer",
              flush=True)


def _w4_small_m(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return wna16_linear(x, q, s, None, 4, 128)


# (block_m or None for the default, block_n, block_k, warps, stages, split_k or None for gemm_splits)
W4_GEMM_SWEEP: dict[int, list[tuple[int | None, int, int, int, int, int | None]]] = {
    16: [(None, 128, 64, 4, 3, 1), (None, 128, 64, 4, 3, None), (16, 64, 128, 4, 3, None),
         (16, 64, 64, 4, 3, None), (16, 32, 128, 4, 3, None), (16, 128, 128, 4, 3, None)],
    64: [(None, 128, 64, 4, 3, 1), (None, 128, 64, 4, 3, None), (64, 64, 128, 4, 3, None),
         (32, 64, 128, 4, 3, None), (64, 64, 64, 4, 3, None), (64, 128, 128, 8, 3, None)],
    256: [(None, 128, 64, 4, 3, 1), (None, 128, 64, 4, 3, None), (128, 128, 64, 8, 3, None),
          (64, 64, 128, 4, 3, None), (128, 64, 64, 4, 3, None), (64, 128, 128, 8, 3, None)],
}


def bench_w4_gemm(rec: Recorder, layers: int = 8) -> None:
    """The 4-bit GEMM (``wna16_linear`` above the GEMV range, groups of 128) at 16, 64 and 256
    tokens over llama3-8b's four projections, at the tilings of ``W4_GEMM_SWEEP`` with split-K
    off and at ``gemm_splits`` for 2 programs per SM, against bf16 cuBLAS."""
    w4 = {name: w4_layers(n, k, layers) for name, (n, k) in SHAPES_8B.items()}
    w16 = {name: [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02 for _ in range(2)]
           for name, (n, k) in SHAPES_8B.items()}
    for m, sweep in W4_GEMM_SWEEP.items():
        xs = {name: torch.randn(m, k, device=DEV, dtype=torch.bfloat16) for name, (_, k) in SHAPES_8B.items()}
        total = 0.0
        for name, (n, k) in SHAPES_8B.items():
            pair = w16[name]
            run16 = chain(F.linear, [(xs[name], pair[i % 2]) for i in range(layers)])
            row = rec.add("w4_gemm", name, f"M={m} cublas bf16", time_chain(run16), n * k * 2, layers)
            total += row["us_per_layer"]
        print(f"w4 gemm M={m}: cublas bf16 {total:.1f} us per layer", flush=True)
        for bm, bn, bk, warps, stages, split in sweep:
            cfg = WnA16Config(gemv_max_m=0, gemm_block_m=bm, gemm_block_n=bn, gemm_block_k=bk,
                              gemm_num_warps=warps, gemm_num_stages=stages, gemm_split_k=split,
                              gemm_programs_per_sm=2)
            variant = f"M={m} {bm},{bn},{bk},{warps},{stages} split {split or 'auto'}"
            total = 0.0
            for name, (n, k) in SHAPES_8B.items():
                run = chain(partial(_w4_gemm, xs[name], cfg), w4[name])
                row = rec.add("w4_gemm", name, variant, time_chain(run), w4_nbytes(n, k), layers)
                total += row["us_per_layer"]
            print(f"w4 gemm {variant}: {total:.1f} us per layer", flush=True)


# The one-token 4-bit word GEMV with xload (the engine's path): (block_n, block_k, warps, split_k),
# splits whose ranges are whole tiles (they keep xload; gated gate_up takes one split only).
W4_SPLIT_TILES = [(8, 2048, 4, 1), (4, 2048, 4, 1), (8, 2048, 8, 1), (2, 2048, 2, 1), (4, 2048, 8, 1),
                  (8, 2048, 16, 1), (16, 2048, 8, 1), (8, 4096, 8, 1),
                  (8, 2048, 4, 2), (8, 1024, 4, 2), (8, 2048, 4, 4), (8, 1024, 4, 4), (8, 2048, 4, 7),
                  (16, 2048, 8, 2)]


def _w4_xload(x: torch.Tensor, tiles: G.GemvTiles, gated: bool, q: torch.Tensor, s: torch.Tensor,
              counters: torch.Tensor | None = None, dp4a: bool = False) -> torch.Tensor:
    return G.gemv_wna16(x, q, s, None, 4, 128, tiles=tiles, gated=gated, pairs=True, peel=True, xload=True,
                        pdl=True, counters=counters, dp4a=dp4a)


def bench_w4_split(rec: Recorder) -> None:
    """The one-token 4-bit word GEMV with its loads in PTX (``xload``) and PDL, as the engine
    launches it, per llama3-8b projection at ``W4_SPLIT_TILES``: more and smaller programs, and
    split-K, its partial sums added by a second launch or (``fixup``, one set of ``counters``
    per layer) by the last program of each row block, for more warps in flight (DECISIONS 139,
    140)."""
    for shape, (n, k) in SHAPES_8B.items():
        gated = shape == "gate_up"
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        w4 = w4_layers(n, k, 32)
        out = []
        for bn, bk, warps, split in W4_SPLIT_TILES:
            if gated and split > 1:
                continue
            tiles = G.GemvTiles(bn, bk, warps, split)
            runs = {f"{bn},{bk},{warps},{split}": w4}
            if split > 1:  # the second launch, and the engine's way (fixup)
                fixed = [(q, s, G.split_counters(n, tiles, DEV)) for q, s in w4]
                runs[f"{bn},{bk},{warps},{split},fixup"] = fixed
            for variant, layers in runs.items():
                ms = time_chain(chain(partial(_w4_xload, x, tiles, gated), layers))
                row = rec.add("w4_split", shape, variant, ms, w4_nbytes(n, k), 32)
                out.append(f"{row['variant']} {row['us_per_layer']:.2f}")
        print(f"w4 xload {shape}: " + " | ".join(out), flush=True)
        del w4
        torch.cuda.empty_cache()


# One-token tilings the integer decode is timed at (block_n, block_k, warps); None: the engine's.
DP4A_TILES: list[tuple[int, int, int] | None] = [None, (8, 2048, 4), (4, 2048, 4), (8, 4096, 8),
                                                 (16, 4096, 8)]


def _dp4a_rounds(rec: Recorder, shape: str, x: torch.Tensor, w4: list[tuple[torch.Tensor, torch.Tensor]],
                 tiles_list: Sequence[tuple[int, int, int] | None], rounds: int, prefix: str = "") -> str:
    """The packed and the integer decode of ``x`` times ``w4`` at each tiling (None: the engine's),
    alternating in ``rounds``; rows ``w4_dp4a``; returns each variant's best, as text."""
    n, k = w4[0][0].shape[0], x.shape[1]
    gated = shape == "gate_up"
    best: dict[str, float] = {}
    for t in tiles_list:
        label = prefix + ("engine" if t is None else ",".join(map(str, t)))
        for _ in range(rounds):
            for dp in (False, True):
                tiles = wna16.m1_tiles(n, k, gated, dp) if t is None else G.GemvTiles(*t, 1)
                ms = time_chain(chain(partial(_w4_xload, x, tiles, gated, dp4a=dp), w4))
                variant = f"{label} {'dp4a' if dp else 'pairs'}"
                row = rec.add("w4_dp4a", shape, variant, ms, w4_nbytes(n, k), 32)
                best[variant] = min(best.get(variant, 1e9), row["us_per_layer"])
    return " | ".join(f"{v} {us:.2f}" for v, us in best.items())


def bench_w4_dp4a(rec: Recorder, rounds: int = 3) -> None:
    """The one-token 4-bit word GEMV with the integer decode (``dp4a``: inputs as 16-bit fixed
    point per thread's two words, ``dp4a`` on the nibbles in place) against the packed 16-bit
    decode, both with the engine's xload / peel / PDL: per llama3-8b projection (gate_up gated)
    at ``DP4A_TILES`` with bf16 inputs and at the engine's tiling with float16 inputs,
    alternating in ``rounds``; each shape's error against the torch reference (random bf16
    inputs, and with one input in 64 made 100 times larger); then 32 decoder layers (norms and
    the four projections as ``wna16.one_token_gemv`` runs them) with ``wna16.M1_DP4A`` off and
    on, both at the engine's tilings (each decode its own: ``wna16.m1_tiles``' ``dp4a``)."""
    for shape, (n, k) in SHAPES_8B.items():
        w4 = w4_layers(n, k, 32)
        x16 = torch.randn(1, k, device=DEV, dtype=torch.float16)
        timed16 = _dp4a_rounds(rec, shape, x16, w4, [None], rounds, "fp16 ")
        print(f"w4 dp4a {shape} float16: {timed16}", flush=True)
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        errs = []
        for name, xin in (("randn", x), ("outliers", x * (1 + 99 * (torch.arange(k, device=DEV) % 64 == 0)))):
            ref = qref.wna16_linear(xin, w4[0][0], w4[0][1], None, 4, 128).float()
            for dp in (False, True):
                got = G.gemv_wna16(xin, *w4[0], None, 4, 128, tiles=wna16.m1_tiles(n, k, dp4a=dp), pairs=True,
                                   xload=True, dp4a=dp).float()
                err = float((got - ref).abs().max() / ref.abs().max())
                errs.append(f"{name} {'dp4a' if dp else 'pairs'} {err:.1e}")
        timed = _dp4a_rounds(rec, shape, x, w4, DP4A_TILES, rounds)
        gated = " gated" if shape == "gate_up" else ""
        print(f"w4 dp4a {shape}{gated} (error / max |ref|: {'; '.join(errs)}): {timed}", flush=True)
        del w4
        torch.cuda.empty_cache()
    layers_w, nbytes, _ = _pdl_layers("w4")

    def linear(h: torch.Tensor, w: Any, gated: bool = False) -> torch.Tensor:
        return wna16.one_token_gemv(h, w[0], w[1], None, 4, 128, None, pdl=True, gated=gated)

    saved = wna16.M1_DP4A
    try:
        for _ in range(rounds):
            for dp in (False, True):
                wna16.M1_DP4A = dp
                run = decoder_chain(layers_w, linear, partial(linear, gated=True), norm_pdl=True)
                variant = "dp4a" if dp else "pairs"
                row = rec.add("w4_dp4a_decoder", "decoder", variant, time_chain(run, reps=20), nbytes, 32)
                print(f"w4 decoder {row['variant']}: {row['us_per_layer']:.2f} us per layer "
                      f"({row['share_of_copy']:.0%} of copy)", flush=True)
    finally:
        wna16.M1_DP4A = saved
    layers_w.clear()
    torch.cuda.empty_cache()


def bench_w4_act(rec: Recorder) -> None:
    """What act-order costs at one token: the engine's 4-bit linears (``get_ops``'s
    ``wna16_linear`` / ``wna16_gated_linear``, PDL on) over 32 llama3-8b layers of qkv, o and
    gate_up (down's order is folded into gate_up's rows at load), each with and without the
    ``index_select`` that reorders its input, and with ``gather_columns`` (the engine's way since:
    a kernel in the PDL chain; ``wna16.reorder_inputs``), alternating twice."""
    from kernels import get_ops

    ops = get_ops(DEV)
    for shape in ("qkv", "o", "gate_up"):
        n, k = SHAPES_8B[shape]
        gated = shape == "gate_up"
        linear = ops.wna16_gated_linear if gated else ops.wna16_linear
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        perm = torch.randperm(k, device=DEV)
        w4 = w4_layers(n, k, 32)

        def plain(q: torch.Tensor, s: torch.Tensor, linear: Any = linear,
                  x: torch.Tensor = x) -> torch.Tensor:
            return linear(x, q, s, None, 4, 128)

        def reordered(q: torch.Tensor, s: torch.Tensor, linear: Any = linear, x: torch.Tensor = x,
                      perm: torch.Tensor = perm) -> torch.Tensor:
            return linear(x.index_select(-1, perm), q, s, None, 4, 128)

        def gathered(q: torch.Tensor, s: torch.Tensor, linear: Any = linear, x: torch.Tensor = x,
                     perm: torch.Tensor = perm) -> torch.Tensor:
            return linear(ops.gather_columns(x, perm), q, s, None, 4, 128)

        out = []
        variants = (("in order", plain), ("act-order index_select", reordered),
                    ("act-order gather_columns", gathered))
        for _ in range(2):
            for variant, fn in variants:
                row = rec.add("w4_act", shape, variant, time_chain(chain(fn, w4)), w4_nbytes(n, k), 32)
                out.append(f"{variant} {row['us_per_layer']:.2f}")
        print(f"w4 act-order {shape}: " + " | ".join(out), flush=True)
        del w4
        torch.cuda.empty_cache()


def _engine_usable(variant: str) -> list[int] | None:
    """A ``w4_split`` variant's tiling if the engine can run it (it adds every split in the GEMV:
    fixup), else None."""
    parts = variant.split(",")
    tiles, flags = [int(v) for v in parts[:4]], set(parts[4:])
    if flags - {"fixup"} or (tiles[3] > 1 and "fixup" not in flags):
        return None
    return tiles


def w4_split_table(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """From ``w4_split`` rows, what the engine should run (bench_gpu.py ``--w4-tiles``):
    ``{"tiles": {"N,K": [block_n, block_k, warps, split]}}`` (``wna16.M1_SHAPE_TILES``): per
    shape, the fastest usable tiling where it is not ``GEMV_M1_TILES`` (gate_up runs gated at
    one token: :func:`bench_w4_split` times it at one split only, as ``wna16.m1_tiles`` runs it)."""
    default = [GEMV_M1_TILES.block_n, GEMV_M1_TILES.block_k, GEMV_M1_TILES.num_warps, GEMV_M1_TILES.split_k]
    table: dict[str, list[int]] = {}
    for shape, (n, k) in SHAPES_8B.items():
        usable = [(r["us_per_layer"], tiles) for r in rows
                  if r["format"] == "w4_split" and r["shape"] == shape
                  and (tiles := _engine_usable(r["variant"])) is not None]
        if usable and (tiles := min(usable)[1]) != default:
            table[f"{n},{k}"] = tiles
    return {"tiles": table}


def engine_settings(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The one-token settings the ``w4_split`` rows favour (bench_gpu.py ``--w4-tiles``):
    :func:`w4_split_table`'s, or none where that part did not run."""
    return w4_split_table(rows) if any(r["format"] == "w4_split" for r in rows) else {}


# WnA16 formats the tensor-core GEMV does not take: (bits, offsets).
SMALL_M_FORMATS = {"w4 asym": (4, True), "w8": (8, False)}
# name: (config, tensor-core GEMV allowed)
SMALL_M_CONFIGS = {"default": (WnA16Config(), True),
                   "token loop": (WnA16Config(gemv_token_loop=True), False),
                   "multi-token gemv": (WnA16Config(gemv_token_loop=False), False),
                   "gemm": (WnA16Config(gemv_max_m=0), False)}


def _wna16_layers(n: int, k: int, bits: int, offsets: bool,
                  layers: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Random ``[n, k]`` weights in ``bits`` (4: packed bytes; 8: int8, or uint8 with offsets),
    groups of 128, float16 scales (and offsets)."""
    out = []
    for _ in range(layers):
        if bits == 4:
            q = torch.randint(0, 256, (n, k // 2), device=DEV, dtype=torch.uint8)
        else:
            q = torch.randint(-128, 128, (n, k), device=DEV, dtype=torch.int8)
        s = (torch.rand(n, k // 128, device=DEV) * 0.02 + 0.001).half()
        o = (torch.randn(n, k // 128, device=DEV) * 0.05).half() if offsets else None
        out.append((q, s, o))
    return out


def _wna16_call(x: torch.Tensor, bits: int, cfg: WnA16Config, q: torch.Tensor, s: torch.Tensor,
                o: torch.Tensor | None) -> torch.Tensor:
    return wna16_linear(x, q, s, o, bits, 128, config=cfg)


def bench_small_m_formats(rec: Recorder, layers: int = 16) -> None:
    """2-16 tokens of the WnA16 formats the tensor-core GEMV does not take (asymmetric 4-bit,
    8-bit) over llama3-8b's four projections: the default dispatch (asymmetric 4-bit: the
    tensor-core GEMV), and without the tensor-core GEMV the one-token GEMV once per token, the
    multi-token CUDA-core GEMV and the GEMM (``SMALL_M_CONFIGS``); one token too."""
    for fmt, (bits, offsets) in SMALL_M_FORMATS.items():
        ws = {name: _wna16_layers(n, k, bits, offsets, layers) for name, (n, k) in SHAPES_8B.items()}
        nbytes = {name: n * k * bits // 8 + n * (k // 128) * (4 if offsets else 2)
                  for name, (n, k) in SHAPES_8B.items()}
        for m in (1, 2, 4, 8, 16):
            xs = {name: torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                  for name, (_, k) in SHAPES_8B.items()}
            totals = []
            for variant, (cfg, mma) in SMALL_M_CONFIGS.items():
                if m == 1 and variant != "default":
                    continue
                total = 0.0
                saved, wna16.MMA_GEMV_MAX_M = wna16.MMA_GEMV_MAX_M, (wna16.MMA_GEMV_MAX_M if mma else 0)
                try:
                    for name in SHAPES_8B:
                        run = chain(partial(_wna16_call, xs[name], bits, cfg), ws[name])
                        row = rec.add(f"small_m {fmt}", name, f"M={m} {variant}", time_chain(run),
                                      nbytes[name], layers)
                        total += row["us_per_layer"]
                finally:
                    wna16.MMA_GEMV_MAX_M = saved
                totals.append(f"{variant} {total:.1f}")
            print(f"{fmt} M={m} (us per layer): {', '.join(totals)}", flush=True)
        del ws
        torch.cuda.empty_cache()


def _w4_gemm(x: torch.Tensor, cfg: WnA16Config, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return wna16_linear(x, q, s, None, 4, 128, config=cfg)


def _parse_tiles(text: str) -> list[tuple[int, int, int]]:
    """``'bn,bk,warps;...'`` as tilings."""
    out = []
    for item in text.split(";"):
        bn, bk, warps = (int(v) for v in item.split(","))
        out.append((bn, bk, warps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="bf16,fp8,w4,fp8_70b,fp8_small_m",
                    help="comma-separated: bf16, fp8, w4, w4_bytes, fp8_70b, fp8_small_m, gated, linear16, "
                         "w4_ptx, linear_fp8, pdl, w4mma, w4gemm, small_m, w4_split, fp8_block, w4_act, "
                         "w4_dp4a")
    ap.add_argument("--json", default="", help="append the rows here (JSON lines)")
    ap.add_argument("--tiles", default="",
                    help="the bf16/fp8 sweep's tilings instead of the default list: 'bn,bk,warps;...'")
    ap.add_argument("--splits", default=",".join(map(str, SPLITS)), help="split-K values of that sweep")
    ap.add_argument("--w4-table", default="",
                    help="with w4_split: write here (JSON) the one-token settings it finds fastest "
                         "(engine_settings: wna16.M1_SHAPE_TILES), for bench_gpu.py --w4-tiles")
    args = ap.parse_args()
    tiles_list = _parse_tiles(args.tiles) if args.tiles else TILES
    splits = [int(v) for v in args.splits.split(",")]
    rec = Recorder(copy_bandwidth_gb_s())
    print(f"{torch.cuda.get_device_name()}: copy {rec.copy:,.0f} GB/s", flush=True)
    for part in args.parts.split(","):
        if part == "fp8_small_m":
            bench_small_m(rec)
        elif part == "gated":
            bench_gated(rec)
        elif part == "linear16":
            bench_linear16(rec)
        elif part == "w4_ptx":
            bench_w4_ptx(rec)
        elif part == "linear_fp8":
            bench_linear_fp8(rec)
        elif part == "pdl":
            bench_pdl(rec)
        elif part == "w4mma":
            bench_w4_mma(rec)
        elif part == "w4gemm":
            bench_w4_gemm(rec)
        elif part == "small_m":
            bench_small_m_formats(rec)
        elif part == "w4_split":
            bench_w4_split(rec)
        elif part == "fp8_block":
            bench_fp8_block(rec)
        elif part == "w4_act":
            bench_w4_act(rec)
        elif part == "w4_dp4a":
            bench_w4_dp4a(rec)
        else:
            bench_format(rec, part, tiles_list, splits)
    if args.w4_table:
        table = engine_settings(rec.rows)
        Path(args.w4_table).write_text(json.dumps(table, indent=1) + "\n")
        print(f"engine settings -> {args.w4_table}: {table}", flush=True)
    layer: dict[tuple[str, str], float] = {}
    for row in rec.rows:
        if row["format"].startswith("linear16"):  # bench_linear16 prints its own comparison
            continue
        if "," in row["variant"] or row["variant"] == "cublas":
            key = (row["format"], row["variant"])
            layer[key] = layer.get(key, 0.0) + row["us_per_layer"]
    for fmt in sorted({f for f, _ in layer}):
        variant, us = min(((v, t) for (f, v), t in layer.items() if f == fmt), key=lambda vt: vt[1])
        print(f"summary {fmt}: best single tiling {variant}: {us:.1f} us per layer (all shapes of a part)")
    if args.json:
        with open(args.json, "a") as f:
            for row in rec.rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
