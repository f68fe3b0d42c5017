"""One launch of each one-token GEMV, for Nsight Compute (``ncu``) on one CUDA GPU.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... \\
        python bench/ncu_gemv.py [--kernels fp8_qkv,fp8_gate_up,...]

Every kernel is compiled, warmed up and timed (``bench_gemv.time_chain``) before
``cudaProfilerStart``, then launched once between start and stop, so ``--profile-from-start off``
profiles exactly one launch of each (no compilation, no warm-up launches). Shapes are llama3-8b's
projections (``bench_gemv.SHAPES_8B``), called as the engine calls them at one token: ``fp8_*``
the weight-only fp8 GEMV (``gemv_fp8_weight_only``, gate_up gated), ``bf16_*`` ``gemv16_linear`` /
``gemv16_gated_linear``, ``w4_*`` ``wna16.one_token_gemv`` (the engine's one-token settings) on
symmetric 4-bit words with groups of 128, ``w4x_*`` ``gemv_wna16`` with ``xload`` forced on
(whatever ``wna16.M1_XLOAD`` says), ``w4mma_*`` the tensor-core 4-bit GEMV (``gemv_int4_mma``, its
default tiles) on the same words, ``w4d_*`` the engine's settings with the integer decode
(``gemv_wna16(dp4a=True)``). The printed times are medians of 20 CUDA-graph replays of one
launch (L2 holding what the previous replay left), a sanity check only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
from bench_gemv import SHAPES_8B, fp8_layers, time_chain  # bench/ is on sys.path as a script

from kernels.triton_ops import gemv as G
from kernels.triton_ops import wna16
from kernels.triton_ops.wna16_mma import gemv_int4_mma

DEV = "cuda"
FORMATS = ("fp8", "bf16", "w4", "w4x", "w4mma", "w4d")


def make_call(name: str) -> Callable[[], torch.Tensor]:
    """The one-token call ``name`` (``<format>_<projection>``) on fresh random weights."""
    fmt, shape = name.split("_", 1)
    if fmt not in FORMATS or shape not in SHAPES_8B:
        raise ValueError(f"unknown kernel {name!r}: formats {FORMATS}, shapes {tuple(SHAPES_8B)}")
    n, k = SHAPES_8B[shape]
    gated = shape == "gate_up"
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    if fmt == "fp8":
        q, s = fp8_layers(n, k, 1)[0]
        return partial(G.gemv_fp8_weight_only, x, q, s, gated=gated)
    if fmt == "bf16":
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
        return partial(G.gemv16_gated_linear, x, w) if gated else partial(G.gemv16_linear, x, w)
    qw = torch.randint(0, 256, (n, k // 2), device=DEV, dtype=torch.uint8)
    sc = (torch.rand(n, k // 128, device=DEV) * 0.02 + 0.001).to(torch.bfloat16)
    if fmt == "w4mma":
        return partial(gemv_int4_mma, x, qw, sc, 128, gated=gated)
    if fmt == "w4d":
        return partial(G.gemv_wna16, x, qw, sc, None, 4, 128, tiles=wna16.m1_tiles(n, k, gated), gated=gated,
                       pairs=True, peel=wna16.M1_PEEL, xload=True, dp4a=True)
    if fmt == "w4x":
        return partial(G.gemv_wna16, x, qw, sc, None, 4, 128, tiles=wna16.GEMV_M1_TILES, gated=gated,
                       pairs=wna16.M1_PAIRS, peel=wna16.M1_PEEL, xload=True)
    return partial(wna16.one_token_gemv, x, qw, sc, None, 4, 128, None, pdl=False, gated=gated)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ",".join(f"{f}_{s}" for f in FORMATS for s in SHAPES_8B)
    ap.add_argument("--kernels", default=default, help=f"comma-separated (default {default})")
    args = ap.parse_args()
    calls = {name: make_call(name) for name in args.kernels.split(",") if name}
    for name, fn in calls.items():  # compiles and warms up each kernel before the profiled launch
        print(f"{name}: {time_chain(fn, reps=20) * 1e3:.1f} us (graph replays, warm L2)", flush=True)
    torch.cuda.cudart().cudaProfilerStart()
    for fn in calls.values():
        fn()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
