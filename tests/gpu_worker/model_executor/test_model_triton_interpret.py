"""Tiny models on the Triton op set (fused rotary + K/V store included) give the reference
logits, on the CPU under ``TRITON_INTERPRET=1``.

Triton reads the variable when a kernel is defined and other tests of this process may have
imported triton already, so the check runs once in a fresh subprocess
(``triton_model_check.py``) and each test reports one family, or the fused gated MLP of a
quantized model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.tiny_models import FAMILIES

GATED_CHECKS = ["gated_mlp_fp8", "gated_mlp_w4", "gated_mlp_16bit"]  # triton_model_check.GATED

pytest.importorskip("triton")

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parents[2]


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    """``{family: "ok" | traceback}`` from one interpreted run."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(_HERE / "triton_model_check.py")],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"check crashed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted([*FAMILIES, *GATED_CHECKS])
    return results


@pytest.mark.parametrize("family", list(FAMILIES))
def test_triton_model_matches_reference_interpreted(interpreted_results: dict[str, str], family: str) -> None:
    assert interpreted_results[family] == "ok", interpreted_results[family]


@pytest.mark.parametrize("check", GATED_CHECKS)
def test_fused_gated_mlp_gives_the_same_logits_interpreted(interpreted_results: dict[str, str],
                                                             check: str) -> None:
    """Tiny llamas with fp8, 4-bit and 16-bit weights: one-token steps through the GEMV with
    SiLU-and-mul in its epilogue give the unfused model's logits (bit for bit where the sums are
    the same; triton_model_check.check_gated_mlp)."""
    assert interpreted_results[check] == "ok", interpreted_results[check]
