"""One of our Triton kernels compiled for sm_90 (H100 / H200) without a GPU, with the ptxas
Triton ships: for the tests that read a kernel's TTGIR or PTX, and for ``bench/sass_report.py``.
Not on the engine's path (a launch compiles for the card it runs on)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_sm90(fn: triton.JITFunction, ptrs: Mapping[str, str], consts: Mapping[str, Any], num_warps: int,
                 num_stages: int | None = None, maxnreg: int | None = None, floats: tuple[str, ...] = (),
                 aligned: bool = True) -> Any:
    """``fn`` compiled for sm_90; its ``asm`` holds ``ttgir``, ``ptx`` and ``cubin``.

    ``ptrs``: the pointer arguments' element types (``"bf16"``, ``"i32"``, ...); ``consts``: the
    constexpr values; constexpr parameters not named take their defaults (as a launch does);
    other arguments are float32 if named in ``floats``, else int32. ``aligned``: every argument
    that is not a constexpr divisible by 16 (pointers 16-byte aligned, what the launches see on
    the card). ``maxnreg``: the registers per thread ptxas may use (Triton's launch option).
    Raises RuntimeError or FileNotFoundError where this Triton build has no CUDA toolchain."""
    names = fn.arg_names
    consts = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default} | dict(consts)
    sig = {n: "*" + ptrs[n] if n in ptrs else "constexpr" if n in consts else "fp32" if n in floats else "i32"
           for n in names}
    attrs = ({(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n] != "constexpr"}
             if aligned else None)
    options: dict[str, int] = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    source = ASTSource(fn, sig, consts, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
