"""bench/bench_gpu.py's per-run step statistics: the full-batch decode steps' median and the
slowest step of the run (where a kernel compiling inside a timed run shows), and the time to the
first full-batch step (the prompts' phase)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_gpu  # noqa: E402


def test_decode_step_stats_median_of_full_steps_and_slowest_of_all() -> None:
    # A 0.5 s first (prefill) step, two partial steps, then three full-batch steps of 10, 12, 30 ms.
    t0 = 100.0
    ends = [0.5, 0.51, 0.52, 0.53, 0.542, 0.572]
    outputs = [0, 2, 3, 4, 4, 4]
    res = {"t_start": t0, "steps": [(k, t0 + e) for k, e in zip(outputs, ends, strict=True)]}
    stats = bench_gpu.decode_step_stats(res, num_seqs=4)
    assert stats["decode_steps"] == 3
    assert stats["decode_step_ms"] == pytest.approx(12.0)
    assert stats["decode_step_mean_ms"] == pytest.approx((10 + 12 + 30) / 3, abs=1e-3)
    assert stats["decode_step_p90_ms"] == pytest.approx(26.4, abs=1e-3)
    assert stats["slowest_step_ms"] == pytest.approx(500.0)
    assert stats["prefill_phase_s"] == pytest.approx(0.52)  # the first full step starts at 0.52 s


def test_decode_step_stats_without_a_full_batch_step_is_empty() -> None:
    res = {"t_start": 0.0, "steps": [(1, 0.1), (2, 0.2)]}
    assert bench_gpu.decode_step_stats(res, num_seqs=4) == {}


def test_latency_step_stats_tells_stalls_from_slower_steps() -> None:
    # W2's shape: a 9 ms first step (the prompt) then ten 2 ms token gaps, one of them 18 ms.
    t0 = 5.0
    gaps = [2.0] * 4 + [18.0] + [2.0] * 5
    ends = np.cumsum([9.0] + gaps) / 1e3
    res = {"t_start": t0, "steps": [(1, t0 + e) for e in ends]}
    stats = bench_gpu.latency_step_stats(res)
    assert stats["decode_step_ms"] == pytest.approx(2.0)
    assert stats["slowest_gap_ms"] == pytest.approx(18.0)
    assert stats["stalls"] == 1
    assert stats["stall_ms"] == pytest.approx(16.0)
    # The same time spread over every gap: no stall, a higher median.
    even = np.cumsum([9.0] + [sum(gaps) / len(gaps)] * len(gaps)) / 1e3
    stats = bench_gpu.latency_step_stats({"t_start": t0, "steps": [(1, t0 + e) for e in even]})
    assert stats["decode_step_ms"] == pytest.approx(3.6)
    assert stats["stalls"] == 0 and stats["stall_ms"] == 0.0


def test_latency_step_stats_skips_steps_without_a_token_and_needs_two() -> None:
    res = {"t_start": 0.0, "steps": [(0, 0.004), (1, 0.009), (0, 0.010), (1, 0.011), (1, 0.013)]}
    stats = bench_gpu.latency_step_stats(res)
    assert stats["decode_step_ms"] == pytest.approx(2.0)  # gaps 2 and 2 ms between token steps
    assert bench_gpu.latency_step_stats({"t_start": 0.0, "steps": [(1, 0.009)]}) == {}


class _TimedRuns:
    """An engine whose ``run`` reports the given TPOTs in turn (the selection, not the engine, is
    under test here; the engine itself runs in bench_gpu.py on a card)."""

    def __init__(self, tpots_ms: list[float]) -> None:
        self.tpots_ms = list(tpots_ms)
        self.calls: list[tuple[int, int]] = []

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict[str, object]:
        self.calls.append((len(prompts[0]), max_tokens))
        tpot = self.tpots_ms.pop(0) / 1e3
        return {"elapsed_s": 0.01 + tpot * (max_tokens - 1), "ttft_s": 0.01, "tag": len(self.calls)}


def test_latency_runs_keeps_the_median_run_and_every_tpot() -> None:
    engine = _TimedRuns([2.15, 2.03, 2.02])
    res, tpot, tpots = bench_gpu.latency_runs(engine, 32, 128, 3)
    assert engine.calls == [(32, 128)] * 3  # W2's request, each run the same
    assert res["tag"] == 2  # the 2.03 ms run: the median, not the first or the fastest
    assert tpot == pytest.approx(2.03e-3)
    assert tpots == pytest.approx([2.15, 2.03, 2.02])
    res, _, tpots = bench_gpu.latency_runs(_TimedRuns([2.0, 3.0]), 32, 128, 2)
    assert res["tag"] == 2 and len(tpots) == 2  # an even count takes the upper middle
    res, _, tpots = bench_gpu.latency_runs(_TimedRuns([2.5]), 32, 128, 0)
    assert res["tag"] == 1 and tpots == pytest.approx([2.5])  # at least one run


def test_kernel_us_counts_device_events_only() -> None:
    """An operator whose kernel the profiler also lists carries that kernel's time as its own
    device time: only the device's rows (kernels, copies) are summed."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    events = [
        SimpleNamespace(key="aten::mm", device_type=DeviceType.CPU, self_device_time_total=190.0),
        SimpleNamespace(key="nvjet_gemm", device_type=DeviceType.CUDA, self_device_time_total=190.0),
        SimpleNamespace(key="Memcpy HtoD", device_type=DeviceType.CUDA, self_device_time_total=2.5),
        SimpleNamespace(key="aten::argmax", device_type=DeviceType.CPU, self_device_time_total=51.0),
        SimpleNamespace(key="reduce_kernel", device_type=DeviceType.CUDA, self_device_time_total=51.0),
    ]
    assert bench_gpu.kernel_us(events) == pytest.approx(243.5)


def test_host_speed_runs_the_real_scheduler_on_a_w3_shaped_step() -> None:
    """The host-speed probe recorded beside W1/W3 times the real scheduler (256 decoding
    requests): a positive, finite number of milliseconds, rounded for the row."""
    import math

    ms = bench_gpu.host_speed_ms()
    assert ms > 0 and math.isfinite(ms)
    assert ms == round(ms, 3)


def _engine_with(graphs: object) -> object:
    """The attribute path ``graph_step_ms`` reads (``engine.core.runner.graphs``)."""
    from types import SimpleNamespace

    return SimpleNamespace(core=SimpleNamespace(runner=SimpleNamespace(graphs=graphs)))


def test_graph_step_ms_needs_a_captured_one_token_graph() -> None:
    from gpu_worker.worker.cuda_graphs import DecodeGraphs

    assert bench_gpu.graph_step_ms(_engine_with(None)) == {}  # --eager, CPU: no graphs
    assert bench_gpu.graph_step_ms(_engine_with(DecodeGraphs([1, 2, 4]))) == {}  # not captured


def test_host_gap_is_the_token_gap_beyond_the_graph() -> None:
    assert bench_gpu.host_gap({"decode_step_ms": 2.03, "graph_step_ms": 1.91}) == {
        "host_gap_ms": pytest.approx(0.12)}
    assert bench_gpu.host_gap({"decode_step_ms": 2.03}) == {}  # no graph time (eager)
    assert bench_gpu.host_gap({"graph_step_ms": 1.91}) == {}  # no token gaps (one token)


@pytest.mark.skipif(not bench_gpu.torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_step_ms_times_the_one_token_graph_on_the_card() -> None:
    """A captured graph of a known amount of work: its replays are timed by CUDA events, and a
    graph of ten times the work takes longer per replay."""
    import torch

    from gpu_worker.worker.cuda_graphs import DecodeGraphs

    x = torch.randn(2048, 2048, device="cuda")

    def times(matmuls: int) -> float:
        graphs = DecodeGraphs([1])

        def body(size: int) -> torch.Tensor:
            y = x[:size]
            for _ in range(matmuls):
                y = y @ x
            return y

        graphs.capture(body, x.device)
        return bench_gpu.graph_step_ms(_engine_with(graphs), replays=10, rounds=3)["graph_step_ms"]

    one, ten = times(1), times(10)
    assert 0 < one < ten
