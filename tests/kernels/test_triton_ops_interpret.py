"""Every Triton kernel against its torch reference, on the CPU under ``TRITON_INTERPRET=1``.

Triton reads ``TRITON_INTERPRET`` when a kernel is defined, and other tests of the same
pytest process may have imported triton already; so the checks run once, in a fresh
subprocess with the variable set, and each test below reports one kernel's result.
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
    "paged_decode_attention",
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "rotary_embedding",
]


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    """``{kernel: "ok" | traceback}`` from one interpreted run of all checks."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(_HERE / "kernel_checks.py")],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"checks crashed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(_KERNELS)
    return results


@pytest.mark.parametrize("kernel", _KERNELS)
def test_kernel_matches_reference_interpreted(interpreted_results: dict[str, str], kernel: str) -> None:
    assert interpreted_results[kernel] == "ok", interpreted_results[kernel]
