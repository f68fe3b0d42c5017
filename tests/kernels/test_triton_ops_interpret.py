"""Every Triton kernel against its torch reference, on the CPU under ``TRITON_INTERPRET=1``.

Triton reads ``TRITON_INTERPRET`` when a kernel is defined, and other tests of the same
pytest process may have imported triton already; so the checks run once, in a fresh
subprocess with the variable set, and each test below reports one kernel's result.

float32 covers every kernel. bf16 covers the kernels whose checks allow for the interpreter
rounding float32 -> bf16 toward zero (the GPU rounds to nearest; the GPU tests cover bf16 for all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parents[1]
_KERNELS = [
    "store_kvcache",
    "paged_attention",
    "paged_attention_split",
    "paged_attention_decodes",
    "paged_decode_attention",
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "rotary_embedding",
    "rotary_store_kvcache",
    "argmax_rows",
]
_KERNELS_BF16 = ["store_kvcache", "rotary_store_kvcache", "argmax_rows"]


def _run_interpreted(dtype: str, kernels: list[str]) -> dict[str, str]:
    """``{kernel: "ok" | traceback}`` from one interpreted run of the checks of ``kernels``."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(_HERE / "kernel_checks.py"), dtype, *kernels],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"checks crashed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(kernels)
    return results


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    return _run_interpreted("float32", _KERNELS)


@pytest.fixture(scope="module")
def interpreted_results_bf16() -> dict[str, str]:
    return _run_interpreted("bfloat16", _KERNELS_BF16)


@pytest.mark.parametrize("kernel", _KERNELS)
def test_kernel_matches_reference_interpreted(interpreted_results: dict[str, str], kernel: str) -> None:
    assert interpreted_results[kernel] == "ok", interpreted_results[kernel]


@pytest.mark.parametrize("kernel", _KERNELS_BF16)
def test_kernel_matches_reference_interpreted_bf16(
    interpreted_results_bf16: dict[str, str], kernel: str
) -> None:
    assert interpreted_results_bf16[kernel] == "ok", interpreted_results_bf16[kernel]
