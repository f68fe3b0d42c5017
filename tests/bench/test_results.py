"""bench/results.py: the cost per million output tokens every GPU benchmark row records, and the
report column that shows it (bench_gpu_report.markdown)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # the scripts import each other so

import bench_gpu_report  # noqa: E402
from results import (  # noqa: E402
    DEFAULT_GPU_PRICE_PER_HOUR_USD,
    ResultRow,
    cost_per_million_output_tokens,
)


def test_cost_is_price_times_gpus_times_elapsed_over_output_tokens() -> None:
    # W1 at 214daf6 (docs/BENCHMARKS.md): 65,536 output tokens in 6.254 s on one GPU.
    tok_s = 65536 / 6.254
    expected = 2.69 * 1 * 6.254 / 3600 / 65536 * 1e6
    assert cost_per_million_output_tokens(DEFAULT_GPU_PRICE_PER_HOUR_USD, 1, tok_s) == pytest.approx(expected)
    assert round(expected, 3) == 0.071  # the figure in the summary table
    # Four GPUs at the same throughput cost four times as much; no throughput, no figure.
    assert cost_per_million_output_tokens(2.69, 4, tok_s) == pytest.approx(4 * expected)
    assert cost_per_million_output_tokens(2.69, 1, 0.0) is None


def test_the_report_shows_the_cost_next_to_the_throughput() -> None:
    row = ResultRow("run", "2026-12-02", "abc", "H200", "W1", "llama3-8b", "llmserve", 10479.31,
                    {"elapsed_s": 6.254, "gpu_price_per_hour_usd": 2.69,
                     "cost_per_million_output_tokens_usd": 0.0713})
    text = bench_gpu_report.markdown([row], "H200", {"copy_GBps": 4200.0, "matmul_TFLOPs": 700.0}, "abc")
    (line,) = [x for x in text.splitlines() if x.startswith("| W1 ")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == "10,479" and cells[6] == "$0.07 at $2.69/GPU-h"
    assert "cost_per_million" not in cells[7] and "elapsed_s 6.254" in cells[7]
