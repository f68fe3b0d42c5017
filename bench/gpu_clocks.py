"""The GPU's SM clock, board power and clock-event reasons while a benchmark run is timed.

An H200 at its 700 W cap lowers its SM clock from about 1,980 to 1,500-1,600 MHz (the driver's
software power cap, clock-event reason 0x4), in the middle of a W3 run too (docs/DECISIONS.md
130): the same tree then runs slower, so the rows say what the card did. :class:`ClockSampler`
runs ``nvidia-smi`` in the background for the span of a ``with`` block; :func:`summarize` turns
its samples into row fields. Without ``nvidia-smi`` nothing is sampled and no field is added.
``nvidia-smi`` refreshes the power reading about every 100 ms, so the sampled power is coarse.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
from dataclasses import dataclass
from types import TracebackType
from typing import Any

QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"
SW_POWER_CAP = 0x4  # NVML clocks event reasons (nvmlClocksEventReason*)
HW_SLOWDOWN = 0x8
SW_THERMAL = 0x20
HW_THERMAL = 0x40
HW_POWER_BRAKE = 0x80
POWER_REASONS = SW_POWER_CAP | HW_POWER_BRAKE
THERMAL_REASONS = SW_THERMAL | HW_THERMAL | HW_SLOWDOWN


@dataclass(frozen=True)
class ClockSample:
    """One ``nvidia-smi`` line: SM clock (MHz), board power (W), clock-event reason bits."""

    sm_mhz: float
    power_w: float
    reasons: int


def parse_samples(text: str) -> list[ClockSample]:
    """The samples of ``nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits`` output;
    lines that do not parse (a value ``[N/A]``, a truncated last line) are skipped."""
    samples = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            samples.append(ClockSample(float(parts[0]), float(parts[1]), int(parts[2], 16)))
        except ValueError:
            continue
    return samples


def summarize(samples: list[ClockSample]) -> dict[str, Any]:
    """Row fields: the SM clock's median and minimum, the largest power reading, and the share
    of samples with a power cap (software cap or hardware power brake) or a thermal or hardware
    slowdown active. Empty without samples."""
    if not samples:
        return {}
    clocks = [s.sm_mhz for s in samples]
    n = len(samples)
    return dict(
        sm_clock_mhz_median=round(statistics.median(clocks)),
        sm_clock_mhz_min=round(min(clocks)),
        power_w_max=round(max(s.power_w for s in samples), 1),
        power_capped_share=round(sum(1 for s in samples if s.reasons & POWER_REASONS) / n, 3),
        thermal_slowdown_share=round(sum(1 for s in samples if s.reasons & THERMAL_REASONS) / n, 3),
        clock_samples=n,
    )


def smi_device_id(cuda_index: int) -> str:
    """``nvidia-smi -i``'s name for torch's CUDA device ``cuda_index``: its PCI bus id (which
    ``CUDA_VISIBLE_DEVICES`` does not renumber), or the index where torch does not give one."""
    import torch

    props = torch.cuda.get_device_properties(cuda_index)
    try:
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except AttributeError:
        return str(cuda_index)


class ClockSampler:
    """``with ClockSampler(smi_device_id(i)) as clocks: <timed run>``, then ``clocks.fields()``.
    Samples every ``interval_ms`` (nvidia-smi's ``-lms``) from entry to exit."""

    def __init__(self, device: str = "0", interval_ms: int = 50) -> None:
        self.device = device
        self.interval_ms = interval_ms
        self._proc: subprocess.Popen[str] | None = None
        self._samples: list[ClockSample] = []

    def __enter__(self) -> ClockSampler:
        exe = shutil.which("nvidia-smi")
        if exe is not None:
            self._proc = subprocess.Popen(
                [exe, "-i", self.device, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                 "-lms", str(self.interval_ms)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            out, _ = self._proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate()
        self._samples = parse_samples(out)
        self._proc = None

    def fields(self) -> dict[str, Any]:
        """:func:`summarize` of the samples taken (empty without ``nvidia-smi``)."""
        return summarize(self._samples)
