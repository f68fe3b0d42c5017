"""Compile, for sm_90 and without a GPU, every Triton kernel configuration the CPU checks launch.

CI has no GPU, so the CPU interpreter is all that runs our kernels there; a kernel that does not
compile for CUDA (a Triton release's API, a layout it cannot lower) would first fail on the card.
This tool closes that gap offline, for any Triton release put first on the path:

    # 1. record: run kernel checks in the interpreter, one JSON line per distinct launch signature
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/compile_sweep.py record sigs.jsonl \\
        tests.kernels.kernel_checks float32 [CHECK ...]
    # 2. compile them for sm_90 with the installed Triton (or e.g. PYTHONPATH=/tmp/t34:. for 3.4)
    PYTHONPATH=. python bench/compile_sweep.py compile [--pdl] [--per-kernel N] sigs.jsonl [...]

A signature is the kernel (module and name), each argument's type (tensor dtype as a pointer,
int32/int64, float32, None), the constexpr values and the launch's ``num_warps`` /
``num_stages``. Pointers and integer arguments are compiled as divisible by 16, as Triton
specializes them for the card's aligned tensors. DECISIONS 136 has a sweep's result.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import runpy
import sys
from typing import Any

import torch

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
           torch.int64: "i64", torch.int16: "i16", torch.uint8: "u8", torch.int8: "i8",
           torch.float8_e4m3fn: "fp8e4nv", torch.bool: "i1"}


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2**31 else "i32"
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return "none"
    raise TypeError(f"no compile type for {type(value).__name__}")


def _constexpr_value(value: Any) -> Any:
    value = getattr(value, "value", value)
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def signature(fn: Any, arg_names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """One launch's compile signature (module docstring)."""
    params = inspect.signature(fn).parameters
    bound = dict(zip(arg_names, args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    for name in arg_names:
        if name not in bound and params[name].default is not inspect.Parameter.empty:
            bound[name] = params[name].default
    sig, consts = {}, {}
    for name in arg_names:
        if "constexpr" in str(params[name].annotation):
            consts[name] = _constexpr_value(bound.get(name))
        else:
            sig[name] = _arg_type(bound.get(name))
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return dict(module=fn.__module__, name=fn.__name__, sig=sig, consts=consts, opts=opts)


def record(out_path: str, module: str, argv: list[str]) -> None:
    """Run ``python -m module *argv`` in the interpreter, writing each new signature to ``out_path``."""
    from triton.runtime import interpreter

    seen: set[str] = set()
    original = interpreter.InterpretedFunction.run
    with open(out_path, "w") as out:
        def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            line = json.dumps(signature(self.fn, self.arg_names, args, kwargs), sort_keys=True)
            if line not in seen:
                seen.add(line)
                out.write(line + "\n")
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)

        interpreter.InterpretedFunction.run = run
        sys.argv = [module, *argv]
        try:
            runpy.run_module(module, run_name="__main__")
        finally:
            interpreter.InterpretedFunction.run = original
    print(f"{len(seen)} signatures in {out_path}")


def compile_all(paths: list[str], pdl: bool = False, per_kernel: int = 0) -> int:
    """Compile each recorded signature for sm_90; print the failures per kernel; their count.
    ``pdl``: kernels taking the ``PDL`` constexpr are compiled with it on (the CPU never launches
    them so; the card does at one token). ``per_kernel``: at most that many signatures of each
    kernel, in recorded order (0: all; a compile takes about 1-2 s here)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    done: collections.Counter[str] = collections.Counter()
    failed: dict[str, list[str]] = {}
    for path in paths:
        for line in open(path):
            rec = json.loads(line)
            if per_kernel and done[rec["name"]] + len(failed.get(rec["name"], [])) >= per_kernel:
                continue
            fn = getattr(importlib.import_module(rec["module"]), rec["name"])
            consts = dict(rec["consts"])
            if pdl and "PDL" in consts:
                consts["PDL"] = True
            sig = {}
            for name in fn.arg_names:
                kind = "constexpr" if name in consts else rec["sig"][name]
                if kind == "none":
                    kind, consts[name] = "constexpr", None
                sig[name] = kind
            attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, kind in sig.items()
                     if kind.startswith("*") or kind in ("i32", "i64")}
            try:
                triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                               options=dict(rec["opts"]))
                done[rec["name"]] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is reported, per kernel
                cause: BaseException = exc  # a CompilationError's message is the source excerpt
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                failed.setdefault(rec["name"], []).append(f"{consts}: {type(cause).__name__}: {cause}")
    print(f"triton {triton.__version__}: {sum(done.values())} compiled for sm_90, "
          f"{sum(map(len, failed.values()))} failed")
    for name, errors in failed.items():
        print(f"  {name}: {len(errors)} failed, e.g. {errors[0][:300]}")
    return sum(map(len, failed.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out")
    rec.add_argument("module")
    rec.add_argument("args", nargs="*")
    comp = sub.add_parser("compile")
    comp.add_argument("paths", nargs="+")
    comp.add_argument("--pdl", action="store_true", help="kernels that take PDL compiled with it on")
    comp.add_argument("--per-kernel", type=int, default=0, help="at most this many signatures per kernel")
    args = ap.parse_args()
    if args.cmd == "record":
        record(args.out, args.module, args.args)
    else:
        sys.exit(1 if compile_all(args.paths, args.pdl, args.per_kernel) else 0)


if __name__ == "__main__":
    main()
