"""Every Triton kernel against its torch reference, on the CPU under ``TRITON_INTERPRET=1``.

Triton reads ``TRITON_INTERPRET`` when a kernel is defined, and other tests of the same
pytest process may have imported triton already; so the checks run once per dtype, in fresh
subprocesses with the variable set, both at once (``tests.helpers.interpreted``), and each
test below reports one kernel's result.

float32 covers every kernel. bf16 covers the kernels whose checks allow for the interpreter
rounding float32 -> bf16 toward zero (the GPU rounds to nearest; the GPU tests cover bf16 for all).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.interpreted import InterpretedRun, run_interpreted

pytest.importorskip("triton")

_HERE = Path(__file__).resolve().parent
_KERNELS = [
    "store_kvcache",
    "paged_attention",
    "paged_attention_split",
    "paged_attention_decodes",
    "paged_decode_attention",
    "decode_prefetch_lines",
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "rotary_embedding",
    "rotary_store_kvcache",
    "argmax_rows",
]
_KERNELS_BF16 = ["store_kvcache", "rotary_store_kvcache", "argmax_rows", "decode_prefetch_lines"]


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, str]]:
    """``{dtype: {kernel: "ok" | traceback}}``: the float32 and bfloat16 runs at once."""
    script = str(_HERE / "kernel_checks.py")
    runs = {dtype: InterpretedRun((script, dtype, *kernels), tuple(kernels))
            for dtype, kernels in (("float32", _KERNELS), ("bfloat16", _KERNELS_BF16))}
    return run_interpreted(runs, timeout_s=600)


@pytest.mark.parametrize("kernel", _KERNELS)
def test_kernel_matches_reference_interpreted(interpreted: dict[str, dict[str, str]], kernel: str) -> None:
    assert interpreted["float32"][kernel] == "ok", interpreted["float32"][kernel]


@pytest.mark.parametrize("kernel", _KERNELS_BF16)
def test_kernel_matches_reference_interpreted_bf16(interpreted: dict[str, dict[str, str]],
                                                   kernel: str) -> None:
    assert interpreted["bfloat16"][kernel] == "ok", interpreted["bfloat16"][kernel]
