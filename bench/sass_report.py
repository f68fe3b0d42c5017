"""The sm_90 machine code of one of our Triton kernels, without a GPU: its hot loop's instruction mix.

    python bench/sass_report.py kernels.triton_ops.gemv _gemv_int4_words_kernel \\
        --ptr x_ptr=bf16,q_ptr=i32,s_ptr=fp16,o_ptr=fp16,bias_ptr=fp16,out_ptr=bf16,part_ptr=bf16 \\
        --const GROUP=128,SUB=8.0,HAS_OFFSET=0,HAS_BIAS=0,SPLIT=0,BLOCK_N=8,BLOCK_K=2048,EVEN=1,GATED=0 \\
        --warps 4

Triton compiles the kernel for an H100/H200 (``GPUTarget("cuda", 90, 32)``) with the ptxas and
nvdisasm it ships: integer arguments not named in ``--const`` are int32 divisible by 16, the
pointers 16-byte aligned (what the launches see on the card). The report counts the opcodes of
the longest loop (a backward branch), e.g. the barriers and shared-memory traffic a layout
conversion adds, or the instructions per weight of a dequantizing GEMV.

Compile with the Triton the GPU machine has, not the local one: layouts differ between
releases (docs/BENCHMARKS.md, "Tensor-core GEMVs (not adopted)": a change without barriers in
Triton 3.9's code ran twice as slow under the card's 3.6). Install that release beside the
project and put it first on the path, e.g.
``pip install --no-deps --target /tmp/t36 triton==3.6.0`` then ``PYTHONPATH=/tmp/t36:.``.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import tempfile

import triton

from kernels.sm90_compile import compile_sm90

_OPCODE = re.compile(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_BRANCH = re.compile(r"BRA `\(\.(L_x_\d+)\)")


def _value(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def _pairs(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item)


def compile_sass(fn: triton.JITFunction, ptrs: dict[str, str], consts: dict[str, int | float],
                 num_warps: int, num_stages: int) -> str:
    """``fn`` compiled for sm_90 as disassembled SASS."""
    return disassemble(compile_sm90(fn, ptrs, consts, num_warps, num_stages))


def _run_on_cubin(kernel: triton.compiler.CompiledKernel, tool: str, *flags: str) -> str:
    """The output of one of the CUDA tools Triton ships (``nvdisasm``, ``cuobjdump``) on the
    kernel's cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
        return subprocess.run([path, *flags, cubin], capture_output=True, text=True, check=True).stdout


def disassemble(kernel: triton.compiler.CompiledKernel) -> str:
    """A compiled kernel's SASS (the nvdisasm Triton ships)."""
    return _run_on_cubin(kernel, "nvdisasm", "-c")


def resource_usage(kernel: triton.compiler.CompiledKernel) -> str:
    """The kernel's registers, shared memory and stack per thread (``cuobjdump -res-usage``)."""
    out = _run_on_cubin(kernel, "cuobjdump", "-res-usage")
    return " ".join(line.strip() for line in out.splitlines() if "REG:" in line)


def hot_loop(sass: str) -> list[str]:
    """The lines of the longest loop (from a label to a branch back to it); the whole kernel
    when it has no loop."""
    lines = sass.splitlines()
    labels = {line.split(":")[0][1:]: i for i, line in enumerate(lines) if re.match(r"\.L_x_\d+:", line)}
    best: tuple[int, int] | None = None
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            start = labels[m.group(1)]
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
    return lines if best is None else lines[best[0]: best[1] + 1]


def opcodes(lines: list[str]) -> collections.Counter[str]:
    return collections.Counter(m.group(1) for line in lines for m in [_OPCODE.search(line)] if m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module")
    ap.add_argument("kernel")
    ap.add_argument("--ptr", default="",
                    help="pointer arguments: name=dtype,... (bf16, fp16, fp32, i32, fp8e4nv)")
    ap.add_argument("--const", default="",
                    help="constexpr arguments: name=value,... (an integer argument named here is "
                         "specialized to its value, as Triton does at run time for 1)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--maxnreg", type=int, default=None, help="cap the registers per thread")
    ap.add_argument("--sass-out", default="", help="also write the whole SASS here")
    ap.add_argument("--ir-out", default="",
                    help="also write Triton's GPU IR (PREFIX.ttgir) and PTX (PREFIX.ptx)")
    args = ap.parse_args()
    fn = getattr(importlib.import_module(args.module), args.kernel)
    consts = {k: _value(v) for k, v in _pairs(args.const).items()}
    kernel = compile_sm90(fn, _pairs(args.ptr), consts, args.warps, args.stages, args.maxnreg)
    sass = disassemble(kernel)
    if args.ir_out:
        for ext in ("ttgir", "ptx"):
            with open(f"{args.ir_out}.{ext}", "w") as f:
                f.write(kernel.asm[ext])
    if args.sass_out:
        with open(args.sass_out, "w") as f:
            f.write(sass)
    loop = opcodes(hot_loop(sass))
    print(f"triton {triton.__version__}, {args.kernel}: {sum(loop.values())} instructions in the hot loop")
    print(f"  {resource_usage(kernel)}")
    for op, count in loop.most_common():
        print(f"  {op:10s} {count}")


if __name__ == "__main__":
    main()
