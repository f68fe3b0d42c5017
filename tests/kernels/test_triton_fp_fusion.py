"""Our Triton kernels compile with FP fusion on (Triton 3.10 turns its default off) unless the
user's environment chooses; Triton reads the choice when a kernel compiles."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROBE = ("import os, kernels.triton_ops, triton.knobs as k; "
          "print(os.environ['TRITON_DEFAULT_FP_FUSION'], k.language.fp_fusion_enabled(None))")


@pytest.mark.parametrize(("chosen", "expected"), [(None, "1 True"), ("0", "0 False"), ("1", "1 True")])
def test_fp_fusion_stays_on_unless_chosen(chosen: str | None, expected: str) -> None:
    knobs = pytest.importorskip("triton.knobs")
    if not hasattr(knobs.language, "fp_fusion_enabled"):
        pytest.skip("this Triton has no TRITON_DEFAULT_FP_FUSION (before 3.9): fusion is always its default")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_DEFAULT_FP_FUSION"}
    if chosen is not None:
        env["TRITON_DEFAULT_FP_FUSION"] = chosen
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
