"""Tiny models on the Triton op set (fused rotary + K/V store included) give the reference
logits, on the CPU under ``TRITON_INTERPRET=1``.

Triton reads the variable when a kernel is defined and other tests of this process may have
imported triton already, so the checks run in fresh subprocesses (``triton_model_check.py``,
two at once: ``tests.helpers.interpreted``) and each test reports one family, or the fused gated
MLP of a quantized model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.interpreted import InterpretedRun, run_interpreted
from tests.helpers.tiny_models import FAMILIES

GATED_CHECKS = ["gated_mlp_fp8", "gated_mlp_w4", "gated_mlp_16bit"]  # triton_model_check.GATED
SPLIT_CHECK = "split_fixup_w4"  # triton_model_check.check_split_fixup
ROPE_CHECKS = ["rope_qkv_w4", "rope_qkv_fp8", "rope_qkv_16bit"]  # triton_model_check.ROPE

pytest.importorskip("triton")

_HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    """``{check: "ok" | traceback}`` from four interpreted runs (two at a time): the three 4-bit
    checks each on its own (most of the time: the interpreter runs their prefills' per-token
    GEMVs program by program) and the rest."""
    script = str(_HERE / "triton_model_check.py")
    alone = ["gated_mlp_w4", SPLIT_CHECK, "rope_qkv_w4"]
    rest = [*FAMILIES, *(c for c in [*GATED_CHECKS, *ROPE_CHECKS] if c not in alone)]
    runs = {name: InterpretedRun((script, name), (name,)) for name in alone}
    runs["rest"] = InterpretedRun((script, *rest), tuple(rest))
    return {check: result for results in run_interpreted(runs, timeout_s=600).values()
            for check, result in results.items()}


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


def test_split_k_added_in_the_gemv_gives_the_second_launchs_logits_interpreted(
        interpreted_results: dict[str, str]) -> None:
    """A tiny 4-bit llama whose one-token GEMVs split K, their sums added by the last program of
    each row block (``Segment.counters``), gives the logits of the same model whose splits are
    added by a second launch, bit for bit, and leaves every count 0
    (triton_model_check.check_split_fixup)."""
    assert interpreted_results[SPLIT_CHECK] == "ok", interpreted_results[SPLIT_CHECK]


@pytest.mark.parametrize("check", ROPE_CHECKS)
def test_rotary_and_kv_store_in_the_qkv_gemv_give_the_same_logits_interpreted(
        interpreted_results: dict[str, str], check: str) -> None:
    """Tiny llamas (4-bit, fp8, 16-bit weights) whose one-token qkv GEMVs rotate and store K/V in
    their epilogue give the logits of the same model running the GEMV, then
    ``rotary_store_kvcache`` (bit for bit where the sums are the same;
    triton_model_check.check_rope_qkv)."""
    assert interpreted_results[check] == "ok", interpreted_results[check]
