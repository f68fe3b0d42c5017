"""bench/trace_gaps.py: the device's idle time in a profiler trace, split by what it waited for."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import trace_gaps  # noqa: E402


def _host(name: str, ts: float, corr: int) -> dict[str, Any]:
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": 2.0,
            "args": {"correlation": corr}}


def _dev(name: str, ts: float, dur: float, corr: int, cat: str = "kernel") -> dict[str, Any]:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _step_trace() -> list[dict[str, Any]]:
    """A copy, a graph of three kernels (gaps of 1 and 2 us inside it), then an argmax the host
    launched 10 us after the graph ended, then a queued copy 0.5 us later."""
    return [
        {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 0.0, "dur": 5.0, "args": {}},
        _host("cudaMemcpyAsync", 0.0, 1),
        _dev("Memcpy HtoD", 5.0, 3.0, 1, "gpu_memcpy"),
        _host("cudaGraphLaunch", 6.0, 2),
        _dev("gemm", 10.0, 20.0, 2),
        _dev("attention", 31.0, 10.0, 2),
        _dev("gemm", 43.0, 20.0, 2),
        _host("cudaLaunchKernel", 73.0, 3),
        _dev("argmax", 75.0, 5.0, 3),
        _host("cudaMemcpyAsync", 74.0, 4),
        _dev("Memcpy DtoH", 80.5, 1.5, 4, "gpu_memcpy"),
    ]


def test_idle_time_is_split_into_graph_host_late_and_queued() -> None:
    report = trace_gaps.gap_report(_step_trace())
    assert report.window_us == pytest.approx(82.0 - 5.0)
    assert report.busy_us == pytest.approx(3 + 20 + 10 + 20 + 5 + 1.5)
    assert report.idle_us == pytest.approx({"queued": 2.0 + 0.5, "graph": 3.0, "host_late": 12.0})
    assert report.window_us == pytest.approx(report.busy_us + sum(report.idle_us.values()))
    largest = report.largest[0]
    assert (largest.kind, largest.before, largest.after, largest.launcher) == (
        "host_late", "gemm", "argmax", "cudaLaunchKernel")
    assert report.per_step(2)["idle_graph_ms"] == pytest.approx(3.0 / 2 / 1e3)


def test_overlapping_events_add_no_gap_and_the_report_reads_a_chrome_trace(tmp_path: Path) -> None:
    events = _step_trace()
    events.append(_dev("side_stream_kernel", 12.0, 40.0, 9))  # covers the graph's two inner gaps
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    report = trace_gaps.gap_report(trace_gaps.load_trace(path))
    assert "graph" not in report.idle_us
    assert report.window_us == pytest.approx(report.busy_us + sum(report.idle_us.values()))
    text = report.text(1)
    assert "idle_host_late_ms: 0.0120" in text and "host_late | cudaLaunchKernel | gemm -> argmax" in text


def test_a_trace_without_device_events_reports_nothing() -> None:
    report = trace_gaps.gap_report([_host("cudaLaunchKernel", 0.0, 1)])
    assert (report.window_us, report.busy_us, report.idle_us, report.largest) == (0.0, 0.0, {}, [])
