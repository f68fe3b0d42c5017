"""Tiny models on the Triton op set (fused rotary + K/V store included) give the reference
logits, on the CPU under ``TRITON_INTERPRET=1``.

Triton reads the variable when a kernel is defined and other tests of this process may have
imported triton already, so the check runs once in a fresh subprocess
(``triton_model_check.py``) and each test reports one family.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.tiny_models import FAMILIES

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
    assert sorted(results) == sorted(FAMILIES)
    return results


@pytest.mark.parametrize("family", list(FAMILIES))
def test_triton_model_matches_reference_interpreted(interpreted_results: dict[str, str], family: str) -> None:
    assert interpreted_results[family] == "ok", interpreted_results[family]
