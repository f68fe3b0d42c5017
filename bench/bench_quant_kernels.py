"""Quantized kernels on one CUDA GPU: fp8 and WnA16 linears on the llama3-8b projections, fp8
KV-cache attention, and the dispatch thresholds they imply.

- linears: ``M`` tokens (default 1, 2, 4, 8, 16, 32, 64, 256, 4096) through the qkv, o, gate_up
  and down projections of llama3-8b (N x K = 6144x4096, 4096x4096, 28672x4096, 4096x14336):
  bf16 cuBLAS (``F.linear``), fp8 ``torch._scaled_mm`` (cuBLASLt, row-wise scales) with and
  without our per-token activation quantization, our fp8 Triton GEMV (M <= 16) and GEMM, and
  the WnA16 Triton kernels: 4-bit group 128 symmetric (GPTQ), 4-bit group 32 with float32
  scales and offsets (GGUF Q4_K), 8-bit group 32 (GGUF Q8_0), GEMV and GEMM forced at small M.
  Bytes counted: weight (+ scales/offsets) + activations in + outputs; GB/s as a share of a
  measured 1 GiB device copy (about 4.2 TB/s on an H200).
- a sweep of the GEMV/GEMM tilings (M = 1 and 16, and prefill sizes);
- decode attention at batch 64 x 2k contexts and prefill 8 x 1,024, bf16 vs fp8 KV cache.

Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call).
The summary prints, per M, the time of one layer's four projections per path, the fastest fp8
path, and the ``gemv_max_m`` thresholds (``Fp8LinearConfig``, ``WnA16Config``) the numbers
support. ``python bench/bench_quant_kernels.py [--json rows.jsonl] [--ms 1,16,256] [--no-sweep]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.testing

from kernels import quant_reference as qref
from kernels import triton_ops as tops
from kernels.triton_ops import fp8_matmul
from kernels.triton_ops.gemv import MAX_M as GEMV_MAX_M
from kernels.triton_ops.gemv import GemvTiles

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DEFAULT_MS = [1, 2, 4, 8, 16, 32, 64, 256, 4096]
GEMV_LIMIT = 64  # largest M the GEMV paths are timed at
DEVICE = "cuda"


@dataclass(frozen=True)
class Row:
    """One measurement."""

    section: str
    path: str
    shape: str
    m: int
    n: int
    k: int
    ms: float
    bytes: int
    copy_gb_s: float
    note: str = ""

    @property
    def gb_s(self) -> float:
        return self.bytes / self.ms / 1e6

    @property
    def share_of_copy(self) -> float:
        return self.gb_s / self.copy_gb_s

    @property
    def tflops(self) -> float:
        return 2 * self.m * self.n * self.k / self.ms / 1e9

    def as_json(self) -> dict[str, object]:
        extra = {"gb_s": self.gb_s, "share_of_copy": self.share_of_copy, "tflops": self.tflops}
        return {**asdict(self), **extra}


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn()`` (CUDA events, L2 flushed before each call)."""
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth_gb_s() -> float:
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device=DEVICE).normal_()  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(partial(dst.copy_, src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class LayerWeights:
    """One projection in every format (random values: speed does not depend on them)."""

    bf16: torch.Tensor
    fp8: torch.Tensor
    fp8_scale: torch.Tensor
    w4_g128: qref.WnA16Weight  # GPTQ 4-bit, group 128, symmetric, float16 scales
    w4_g32: qref.WnA16Weight  # GGUF Q4_K-like: 4-bit, group 32, float32 scales and offsets
    w8_g32: qref.WnA16Weight  # GGUF Q8_0: int8, group 32, float16 scales

    @property
    def fp8_bytes(self) -> int:
        return _nbytes(self.fp8, self.fp8_scale)


def make_weights(n: int, k: int, gen: torch.Generator) -> LayerWeights:
    w = (torch.randn(n, k, generator=gen) * 0.02).to(DEVICE, torch.bfloat16)
    w_fp8, s = qref.quantize_fp8_rows(w)

    def grouped(bits: int, group: int, offsets: bool, sdt: torch.dtype) -> qref.WnA16Weight:
        g = k // group
        if bits == 4:
            q = qref.pack_int4(torch.randint(0, 16, (n, k), generator=gen))
        else:
            q = torch.randint(-128, 128, (n, k), generator=gen).to(torch.int8)
        sc = (torch.rand(n, g, generator=gen) * 0.01 + 1e-3).to(sdt)
        off = (torch.randn(n, g, generator=gen) * 0.01).to(sdt) if offsets else None
        return qref.WnA16Weight(q, sc, off, bits, group).to(DEVICE)

    return LayerWeights(
        w, w_fp8, s.reshape(-1),
        grouped(4, 128, False, torch.float16),
        grouped(4, 32, True, torch.float32),
        grouped(8, 32, False, torch.float16),
    )


def _scaled_mm_only(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16)


def _wna16(x: torch.Tensor, w: qref.WnA16Weight, config: tops.WnA16Config | None = None) -> torch.Tensor:
    return tops.wna16_linear(x, w.qweight, w.scales, w.offsets, w.bits, w.group_size, config=config)


Case = tuple[str, int, str, Callable[[], object]]  # path, weight bytes, note, call


def _linear_cases(x: torch.Tensor, lw: LayerWeights) -> list[Case]:
    m = x.shape[0]
    fp8 = (x, lw.fp8, lw.fp8_scale)
    cases: list[Case] = [("bf16 cublas", _nbytes(lw.bf16), "", partial(F.linear, x, lw.bf16))]
    if fp8_matmul.scaled_mm_applies(x, x.dtype, lw.fp8):
        xq, xs = tops.quantize_fp8_per_token(x)
        no_gemv = tops.Fp8LinearConfig(gemv_max_m=0)
        quant_mm = partial(tops.fp8_linear, *fp8, config=no_gemv)
        cases.append(("fp8 scaled_mm+quant", lw.fp8_bytes, "", quant_mm))
        only = partial(_scaled_mm_only, xq, xs, lw.fp8, lw.fp8_scale)
        cases.append(("fp8 scaled_mm only", lw.fp8_bytes, "pre-quantized x", only))
    if m <= GEMV_MAX_M:
        cases.append(("fp8 triton gemv", lw.fp8_bytes, "", partial(fp8_matmul.fp8_gemv, *fp8)))
    if m >= 16:
        gemm = tops.Fp8LinearConfig(gemv_max_m=0, use_scaled_mm=False)
        cases.append(("fp8 triton gemm+quant", lw.fp8_bytes, "", partial(tops.fp8_linear, *fp8, config=gemm)))
    for label, wq in (("w4a16 g128", lw.w4_g128), ("w4a16 g32 asym", lw.w4_g32), ("w8a16 g32", lw.w8_g32)):
        cases.append((label, wq.nbytes, "default dispatch", partial(_wna16, x, wq)))
    w4 = lw.w4_g128
    if m <= GEMV_LIMIT:
        force_gemv = tops.WnA16Config(gemv_max_m=1 << 30)
        cases.append(("w4a16 g128 gemv", w4.nbytes, "", partial(_wna16, x, w4, force_gemv)))
    if m >= 16:
        force_gemm = tops.WnA16Config(gemv_max_m=0)
        cases.append(("w4a16 g128 gemm", w4.nbytes, "", partial(_wna16, x, w4, force_gemm)))
    return cases


def linear_rows(ms_list: list[int], copy: float) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    for shape, (n, k) in SHAPES.items():
        lw = make_weights(n, k, gen)
        for m in ms_list:
            x = torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16)
            io = _nbytes(x) + m * n * 2
            for path, weight_bytes, note, fn in _linear_cases(x, lw):
                rows.append(Row("linear", path, shape, m, n, k, bench(fn), weight_bytes + io, copy, note))
    return rows


GEMV_TILES = {  # M -> (block_n, block_k, warps)
    1: [(16, 512, 4), (8, 512, 4), (16, 256, 4), (32, 256, 8), (4, 1024, 4), (8, 1024, 8),
        (1, 1024, 4), (1, 2048, 4), (2, 1024, 4), (2, 2048, 8), (4, 512, 2), (4, 1024, 2),
        (4, 2048, 4), (4, 2048, 8), (8, 256, 2), (8, 512, 8), (2, 512, 2), (1, 512, 1)],
    16: [(8, 64, 4), (16, 32, 4), (8, 128, 8), (4, 128, 4), (16, 64, 8)],
}
GEMM_TILES = {  # (block_m, block_n, block_k, warps, stages)
    "fp8": [(128, 128, 128, 8, 3), (128, 128, 64, 8, 4), (64, 128, 128, 4, 4), (128, 256, 64, 8, 3)],
    "w4": [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 64, 64, 4, 3)],
}


def _sweep_cases(x: torch.Tensor, lw: LayerWeights) -> list[Case]:
    cases: list[Case] = []
    fp8 = (x, lw.fp8, lw.fp8_scale)
    w4 = lw.w4_g128
    for bn, bk, warps in GEMV_TILES.get(x.shape[0], []):
        note = f"block_n={bn} block_k={bk} warps={warps}"
        fcfg = tops.Fp8LinearConfig(gemv_tiles=GemvTiles(bn, bk, warps))
        cases.append(("fp8 triton gemv", lw.fp8_bytes, note, partial(fp8_matmul.fp8_gemv, *fp8, config=fcfg)))
        wcfg = tops.WnA16Config(gemv_max_m=64, gemv_block_n=bn, gemv_block_k=bk, gemv_num_warps=warps)
        cases.append(("w4a16 g128 gemv", w4.nbytes, note, partial(_wna16, x, w4, wcfg)))
    if x.shape[0] in (256, 4096):
        for bm, bn, bk, warps, stages in GEMM_TILES["fp8"]:
            note = f"{bm}x{bn}x{bk} warps={warps} stages={stages}"
            cfg = tops.Fp8LinearConfig(gemv_max_m=0, use_scaled_mm=False, gemm_block_m=bm, gemm_block_n=bn,
                                       gemm_block_k=bk, gemm_num_warps=warps, gemm_num_stages=stages)
            call = partial(tops.fp8_linear, *fp8, config=cfg)
            cases.append(("fp8 triton gemm+quant", lw.fp8_bytes, note, call))
        for bm, bn, bk, warps, stages in GEMM_TILES["w4"]:
            note = f"{bm}x{bn}x{bk} warps={warps} stages={stages}"
            wcfg = tops.WnA16Config(gemv_max_m=0, gemm_block_m=bm, gemm_block_n=bn, gemm_block_k=bk,
                                    gemm_num_warps=warps, gemm_num_stages=stages)
            cases.append(("w4a16 g128 gemm", w4.nbytes, note, partial(_wna16, x, w4, wcfg)))
    return cases


def sweep_rows(copy: float, sweep_ms: tuple[int, ...] = (1, 16, 256, 4096)) -> list[Row]:
    """GEMV tilings at M = 1 and 16, GEMM tilings at 256 and 4096 (o and gate_up shapes)."""
    gen = torch.Generator().manual_seed(1)
    rows: list[Row] = []
    for shape in ("o", "gate_up"):
        n, k = SHAPES[shape]
        lw = make_weights(n, k, gen)
        for m in sweep_ms:
            x = torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16)
            io = _nbytes(x) + m * n * 2
            for path, weight_bytes, note, fn in _sweep_cases(x, lw):
                rows.append(Row("sweep", path, shape, m, n, k, bench(fn), weight_bytes + io, copy, note))
    return rows


DECODE_FP8_TILES = ((128, 4), (32, 2), (64, 4))  # (block_n, warps) tried besides the default
ATTENTION_CASES = (("decode", 64, 2048), ("prefill", 8, 1024))  # (kind, sequences, context tokens)


def attention_rows(copy: float) -> list[Row]:
    """Decode (batch 64 x 2,048 tokens) and prefill (8 x 1,024), llama3-8b heads, bf16 vs fp8 KV."""
    gen = torch.Generator().manual_seed(2)
    hq, hk, d, bs = 32, 8, 128, 16
    rows: list[Row] = []
    for kind, batch, ctx in ATTENTION_CASES:
        blocks = ctx // bs
        num_blocks = batch * blocks
        table = torch.randperm(num_blocks, generator=gen).view(batch, blocks).to(DEVICE, torch.int32)
        k16 = torch.randn(num_blocks, bs, hk, d, generator=gen).to(DEVICE, torch.bfloat16)
        v16 = torch.randn(num_blocks, bs, hk, d, generator=gen).to(DEVICE, torch.bfloat16)
        ks = qref.fp8_kv_scale(k16.view(-1, hk, d), per_head=True)
        vs = qref.fp8_kv_scale(v16.view(-1, hk, d), per_head=True)
        k8 = qref.quantize_fp8_with_scale(k16, ks.view(-1, 1))
        v8 = qref.quantize_fp8_with_scale(v16, vs.view(-1, 1))
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
        q_len = 1 if kind == "decode" else ctx
        q = torch.randn(batch * q_len, hq, d, generator=gen).to(DEVICE, torch.bfloat16)
        starts = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=DEVICE)
        name = f"b{batch}x{ctx}"
        for cache, kc, vc, ksc, vsc in (("bf16", k16, v16, None, None), ("fp8", k8, v8, ks, vs)):
            kv_bytes = _nbytes(kc, vc)
            if kind == "prefill":
                fn = partial(tops.paged_attention, q, kc, vc, table, starts, lens, d**-0.5, ctx, ctx,
                             k_scale=ksc, v_scale=vsc)
                path = f"prefill {cache} KV"
                rows.append(Row("attention", path, name, batch * ctx, hq, d, bench(fn), kv_bytes, copy))
                continue
            configs: list[tops.DecodeConfig | None] = [None]
            if cache == "fp8":
                configs += [tops.DecodeConfig(block_n=bn, num_warps=w) for bn, w in DECODE_FP8_TILES]
            for cfg in configs:
                fn = partial(tops.paged_decode_attention, q, kc, vc, table, lens, d**-0.5, ctx, config=cfg,
                             k_scale=ksc, v_scale=vsc)
                note = "default tiles" if cfg is None else f"block_n={cfg.block_n} warps={cfg.num_warps}"
                path = f"decode {cache} KV"
                rows.append(Row("attention", path, name, batch, hq, d, bench(fn), kv_bytes, copy, note))
    return rows


FP8_PATHS = ("fp8 triton gemv", "fp8 scaled_mm+quant", "fp8 triton gemm+quant")


def summarize(rows: list[Row], ms_list: list[int]) -> list[str]:
    """Per M: one layer's four projections per path; fastest fp8 path; the thresholds."""
    layer: dict[tuple[str, int], float] = {}
    count: dict[tuple[str, int], int] = {}
    for r in rows:
        if r.section == "linear":
            layer[(r.path, r.m)] = layer.get((r.path, r.m), 0.0) + r.ms
            count[(r.path, r.m)] = count.get((r.path, r.m), 0) + 1
    complete = {key: v for key, v in layer.items() if count[key] == len(SHAPES)}
    paths = sorted({p for p, _ in complete})
    lines = ["one llama3-8b layer (qkv + o + gate_up + down): ms (speed-up over bf16 cuBLAS)"]
    lines.append(f"{'M':>6}  " + "  ".join(f"{p:>24}" for p in paths))
    best_fp8: dict[int, str] = {}
    for m in ms_list:
        base = complete.get(("bf16 cublas", m))
        cells = []
        for p in paths:
            v = complete.get((p, m))
            speedup = base / v if base and v else 0.0
            cells.append(" " * 24 if v is None else f"{v:12.4f} ({speedup:5.2f}x)".rjust(24))
        lines.append(f"{m:>6}  " + "  ".join(cells))
        options = {p: complete[(p, m)] for p in FP8_PATHS if (p, m) in complete}
        if options:
            best_fp8[m] = min(options, key=options.__getitem__)
    lines.append("fastest fp8 path per M: " + ", ".join(f"M={m}: {p}" for m, p in best_fp8.items()))
    gemv_ms = [m for m, p in best_fp8.items() if p == "fp8 triton gemv"]
    lines.append(f"=> Fp8LinearConfig.gemv_max_m = {max(gemv_ms) if gemv_ms else 0} "
                 "(largest tested M where the fused GEMV wins)")
    gemv, gemm = "w4a16 g128 gemv", "w4a16 g128 gemm"
    w_gemv = [m for m in ms_list if (gemv, m) in complete
              and ((gemm, m) not in complete or complete[(gemv, m)] <= complete[(gemm, m)])]
    lines.append(f"=> WnA16Config.gemv_max_m = {max(w_gemv) if w_gemv else 0} "
                 "(largest tested M where GEMV beats GEMM)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="append the rows here (JSON lines)")
    parser.add_argument("--ms", default=",".join(map(str, DEFAULT_MS)), help="token counts M (1,16,...)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tiling sweep")
    parser.add_argument("--sweep-ms", default="1,16,256,4096", help="token counts the sweep times")
    args = parser.parse_args()
    ms_list = [int(v) for v in args.ms.split(",")]
    torch.manual_seed(0)
    context = {"date": datetime.date.today().isoformat(), "card": torch.cuda.get_device_name(),
               "capability": ".".join(map(str, torch.cuda.get_device_capability())),
               "torch": torch.__version__, "triton": triton.__version__}
    copy = copy_bandwidth_gb_s()
    context["copy_gb_s"] = str(round(copy, 1))
    print(json.dumps(context), flush=True)
    rows = linear_rows(ms_list, copy)
    rows += attention_rows(copy)
    if not args.no_sweep:
        rows += sweep_rows(copy, tuple(int(v) for v in args.sweep_ms.split(",")))
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**context, **r.as_json()}) + "\n")
    print(f"{'section':<9} {'path':<24} {'shape':<9} {'M':>5} {'ms':>9} {'GB/s':>7} {'%copy':>6} "
          f"{'TFLOP/s':>8}  note")
    for r in rows:
        print(f"{r.section:<9} {r.path:<24} {r.shape:<9} {r.m:>5} {r.ms:9.4f} {r.gb_s:7.0f} "
              f"{100 * r.share_of_copy:5.1f}% {r.tflops:8.1f}  {r.note}")
    print()
    print("\n".join(summarize(rows, ms_list)))


if __name__ == "__main__":
    main()
