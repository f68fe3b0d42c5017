"""The quantized kernels against their torch references on the CPU, under ``TRITON_INTERPRET=1``.

As in ``test_triton_ops_interpret.py``, the checks (``quant_kernel_checks.py``) run once per
dtype in a fresh subprocess with the variable set, the three at once
(``tests.helpers.interpreted``). float32 and float16 cover every kernel. bfloat16 covers
those that round to bf16 only their output: the interpreter's ``tl.dot`` on bf16 operands
returns garbage and it rounds float32 -> bf16 toward zero, so the WnA16 kernels (which round
each dequantized weight to bf16, as the reference does) and the attention kernels are checked
in bf16 on the GPU only (``test_quant_ops_gpu.py``).
"""

from __future__ import annotations

import pytest

from tests.helpers.interpreted import InterpretedRun, run_interpreted

pytest.importorskip("triton")

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
    "fp8_block_gemv",
    "fp8_block_gemm",
    "gather_columns",
    "gemv_wna16",
    "gemv_gated",
    "gemv_rope",
    "gemv_int4_mma",
    "fused_fp8_quant",
    "store_kvcache_fp8",
    "rotary_store_kvcache_fp8",
    "paged_attention_fp8",
    "paged_decode_attention_fp8",
]
_BF16 = ["fp8_quantize", "fp8_gemv", "fp8_gemm", "fp8_linear", "gemv16", "gemv_fp8", "gemv_fp8_weight_only",
         "fp8_block_gemv", "fp8_block_gemm", "gather_columns", "fused_fp8_quant", "store_kvcache_fp8",
         "rotary_store_kvcache_fp8"]
_RUNS = {"float32": _ALL, "float16": _ALL, "bfloat16": _BF16}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, str]]:
    """``{dtype: {check: "ok" | traceback}}``: the three dtypes' runs at once."""
    runs = {dtype: InterpretedRun(("-m", "tests.kernels.quant_kernel_checks", dtype, *checks), tuple(checks))
            for dtype, checks in _RUNS.items()}
    return run_interpreted(runs, timeout_s=900)


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
