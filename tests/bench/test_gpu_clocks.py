"""bench/gpu_clocks.py: the card's clock, power and clock-event reasons during a timed run."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import gpu_clocks  # noqa: E402

# Lines as nvidia-smi printed them on the H200 during a W3 run (--format=csv,noheader,nounits
# of clocks.sm, power.draw, clocks_event_reasons.active), a value the driver could not read,
# and a line cut short when the sampler was stopped.
H200_LINES = """1965, 386.14, 0x0000000000000004
1980, 370.06, 0x0000000000000000
1515, 640.16, 0x0000000000000004
1575, 692.03, 0x0000000000000004
1980, 484.29, 0x0000000000000000
1530, [N/A], 0x0000000000000004
1905, 69"""


def test_parse_skips_what_does_not_read() -> None:
    samples = gpu_clocks.parse_samples(H200_LINES)
    assert [s.sm_mhz for s in samples] == [1965, 1980, 1515, 1575, 1980]
    assert samples[2] == gpu_clocks.ClockSample(1515.0, 640.16, gpu_clocks.SW_POWER_CAP)


def test_summary_of_a_power_capped_run() -> None:
    fields = gpu_clocks.summarize(gpu_clocks.parse_samples(H200_LINES))
    assert fields == dict(sm_clock_mhz_median=1965, sm_clock_mhz_min=1515, power_w_max=692.0,
                          power_capped_share=0.6, thermal_slowdown_share=0.0, clock_samples=5)
    thermal = gpu_clocks.summarize([gpu_clocks.ClockSample(1400.0, 500.0, gpu_clocks.HW_THERMAL),
                                    gpu_clocks.ClockSample(1980.0, 300.0, 0)])
    assert thermal["thermal_slowdown_share"] == 0.5 and thermal["power_capped_share"] == 0.0


def test_nothing_sampled_adds_no_field() -> None:
    assert gpu_clocks.summarize([]) == {}
    if shutil.which("nvidia-smi") is None:  # this machine: the sampler runs nothing
        with gpu_clocks.ClockSampler() as clocks:
            pass
        assert clocks.fields() == {}
