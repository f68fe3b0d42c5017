"""Tiny models of every family on the Triton op set against the torch references (CPU).

Run as ``python triton_model_check.py`` with ``TRITON_INTERPRET=1`` (triton reads it when the
kernels are defined, so ``test_model_triton_interpret.py`` runs this in a fresh subprocess);
prints one JSON object ``{family: "ok" | traceback}``. The Triton set rotates and stores K/V
with its fused ``rotary_store_kvcache``; its separate rotary and store ops are replaced by
failing stubs, so a model that still called them would fail.
"""

from __future__ import annotations

import dataclasses
import json
import traceback
from typing import NoReturn

import torch

from kernels import reference_ops
from kernels.triton_ops import triton_ops
from tests.gpu_worker.model_executor.tiny_model_steps import STEPS, build_model, run_steps
from tests.helpers.tiny_models import FAMILIES, make_tiny_config


def _not_called(*_: object) -> NoReturn:
    raise AssertionError("the fused rotary_store_kvcache path must replace this op")


def check_family(family: str) -> None:
    """float32 logits of a prefill and two decode steps: Triton (interpreted) vs reference."""
    cfg = make_tiny_config(family)
    want = run_steps(build_model(cfg, reference_ops()), cfg, STEPS)
    ops = dataclasses.replace(triton_ops(), rotary_embedding=_not_called, store_kvcache=_not_called)
    got = run_steps(build_model(cfg, ops), cfg, STEPS)
    # Same float32 math in another order (attention tiles, online softmax): logits up to ~8
    # agree to ~1e-5 after two layers; 1e-4 leaves a margin, a wrong K/V row costs far more.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def run_all() -> dict[str, str]:
    results: dict[str, str] = {}
    for family in FAMILIES:
        try:
            check_family(family)
            results[family] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent test, per family
            results[family] = traceback.format_exc()
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(run_all()))
