"""The quantized kernels against their torch references on the CPU, under ``TRITON_INTERPRET=1``.

As in ``test_triton_ops_interpret.py``, the checks (``quant_kernel_checks.py``) run once per
dtype in a fresh subprocess with the variable set. float32 and float16 cover every kernel.
bfloat16 covers those that round to bf16 only their output: the interpreter's ``tl.dot`` on
bf16 operands returns garbage and it rounds float32 -> bf16 toward zero, so the WnA16 kernels
(which round each dequantized weight to bf16, as the reference does) and the attention
kernels are checked in bf16 on the GPU only (``test_quant_ops_gpu.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

_ROOT = Path(__file__).resolve().parents[2]
_ALL = [
    "fp8_quantize",
    "fp8_gemv",
    "fp8_gemm",
    "fp8_linear",
    "wna16_gemv",
    "wna16_gemm",
    "gemv16",
    "gemv_fp8",
    "gemv_fp8_weight_only",
    "gemv_wna16",
    "gemv_gated",
    "gemv_int4_mma",
    "fused_fp8_quant",
    "store_kvcache_fp8",
    "rotary_store_kvcache_fp8",
    "paged_attention_fp8",
    "paged_decode_attention_fp8",
]
_BF16 = ["fp8_quantize", "fp8_gemv", "fp8_gemm", "fp8_linear", "gemv16", "gemv_fp8", "gemv_fp8_weight_only",
         "fused_fp8_quant", "store_kvcache_fp8", "rotary_store_kvcache_fp8"]
_RUNS = {"float32": _ALL, "float16": _ALL, "bfloat16": _BF16}


def _run_interpreted(dtype: str, checks: list[str]) -> dict[str, str]:
    """``{check: "ok" | traceback}`` from one interpreted run of ``checks``."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.quant_kernel_checks", dtype, *checks],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, f"checks crashed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(checks)
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, str]]:
    return {dtype: _run_interpreted(dtype, checks) for dtype, checks in _RUNS.items()}


@pytest.mark.parametrize(
    ("dtype", "check"), [(dtype, check) for dtype, checks in _RUNS.items() for check in checks]
)
def test_quant_kernel_matches_reference_interpreted(
    interpreted: dict[str, dict[str, str]], dtype: str, check: str
) -> None:
    assert interpreted[dtype][check] == "ok", interpreted[dtype][check]


def test_weight_only_token_limit_is_the_gemvs() -> None:
    """``kernels`` (torch only, no triton import) states the weight-only GEMV's token limit
    again; it must be the GEMV's own."""
    from kernels import FP8_WEIGHT_ONLY_MAX_M_LIMIT
    from kernels.triton_ops import gemv

    assert FP8_WEIGHT_ONLY_MAX_M_LIMIT == gemv.MAX_M
