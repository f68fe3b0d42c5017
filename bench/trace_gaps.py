"""Where the device waits: idle gaps between device events in a torch.profiler Chrome trace.

A profiler's ``key_averages()`` sums kernel time; the step's wall time also holds the gaps
between kernels. This module reads the trace that ``profile.export_chrome_trace`` writes and
splits the device's idle time over a window into:

- **inside a graph**: between two kernels of one ``cudaGraphLaunch`` (the graph's own kernel
  boundaries, which only fewer kernels shorten);
- **host late**: before a device event whose host call (launch, copy, graph launch) began after
  the previous device event had ended, so the device had nothing queued (the host's work per
  step is on the critical path);
- **queued**: the rest, gaps between separately launched events that were queued in time
  (launch latency, stream dependencies).

Each device event is tied to its host call by the trace's ``correlation`` id. The profiler's
own host overhead lengthens host-late gaps; inside-graph gaps are the device's own.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVICE_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
HOST_CATEGORIES = frozenset({"cuda_runtime", "cuda_driver"})


@dataclass(frozen=True)
class DeviceEvent:
    """One kernel, copy or memset on the device (microseconds, the trace's clock)."""

    name: str
    start: float
    end: float
    correlation: int


@dataclass(frozen=True)
class Gap:
    """Idle device time before ``after``; ``kind`` is ``graph``, ``host_late`` or ``queued``."""

    us: float
    kind: str
    before: str
    after: str
    launcher: str


@dataclass(frozen=True)
class GapReport:
    """A window's device time: busy (union of events), idle by kind, and the largest gaps."""

    window_us: float
    busy_us: float
    idle_us: dict[str, float]
    gaps_by_pair: list[tuple[str, int, float]]
    largest: list[Gap]

    def per_step(self, steps: int) -> dict[str, float]:
        """Milliseconds per step: window, busy and each idle kind."""
        out = {"window_ms": self.window_us / steps / 1e3, "busy_ms": self.busy_us / steps / 1e3}
        out.update({f"idle_{k}_ms": v / steps / 1e3 for k, v in sorted(self.idle_us.items())})
        return out

    def text(self, steps: int) -> str:
        """A readable report: per-step figures, gaps grouped by (launcher, before -> after)."""
        lines = [f"{k}: {v:.4f}" for k, v in self.per_step(steps).items()]
        lines.append("\nidle by (kind | launcher | before -> after): count, us per step")
        lines += [f"{n:6d} {us / steps:9.2f}  {key}" for key, n, us in self.gaps_by_pair]
        lines.append("\nlargest gaps (us, kind, launcher, before -> after)")
        lines += [f"{g.us:9.2f} {g.kind:9s} {g.launcher:24s} {g.before[:50]} -> {g.after[:50]}"
                  for g in self.largest]
        return "\n".join(lines) + "\n"


def load_trace(path: Path) -> list[dict[str, Any]]:
    """The ``traceEvents`` of a Chrome trace file."""
    data = json.loads(Path(path).read_text())
    return list(data["traceEvents"] if isinstance(data, dict) else data)


def _correlation(event: dict[str, Any]) -> int | None:
    args = event.get("args") or {}
    value = args.get("correlation")
    return int(value) if value is not None else None


def gap_report(events: list[dict[str, Any]], top: int = 15, pairs: int = 25) -> GapReport:
    """Split the device's idle time between its first and last event (see the module doc).

    Events overlapping earlier ones (another stream) add no gap; a gap is only counted where the
    device had no event running at all."""
    hosts: dict[int, tuple[str, float]] = {}
    device: list[DeviceEvent] = []
    for e in events:
        if e.get("ph") != "X":
            continue
        corr = _correlation(e)
        if corr is None:
            continue
        cat = e.get("cat", "")
        if cat in HOST_CATEGORIES:
            hosts[corr] = (str(e.get("name", "")), float(e["ts"]))
        elif cat in DEVICE_CATEGORIES:
            start = float(e["ts"])
            device.append(DeviceEvent(str(e.get("name", "")), start, start + float(e.get("dur", 0.0)), corr))
    device.sort(key=lambda d: d.start)
    if not device:
        return GapReport(0.0, 0.0, {}, [], [])
    idle: Counter[str] = Counter()
    grouped: dict[str, list[float]] = {}
    gaps: list[Gap] = []
    busy = 0.0
    prev = device[0]
    running_end = prev.end
    busy_start = prev.start
    for d in device[1:]:
        if d.start <= running_end:  # overlaps what is running: no idle time
            if d.end > running_end:
                running_end = d.end
            prev = d if d.end >= prev.end else prev
            continue
        busy += running_end - busy_start
        launcher, host_ts = hosts.get(d.correlation, ("?", d.start))
        if d.correlation == prev.correlation and launcher.startswith("cudaGraphLaunch"):
            kind = "graph"
        elif host_ts > running_end:
            kind = "host_late"
        else:
            kind = "queued"
        gap = Gap(d.start - running_end, kind, prev.name, d.name, launcher)
        idle[kind] += gap.us
        key = f"{kind} | {launcher} | {prev.name[:40]} -> {d.name[:40]}"
        grouped.setdefault(key, []).append(gap.us)
        gaps.append(gap)
        busy_start, running_end, prev = d.start, d.end, d
    busy += running_end - busy_start
    by_pair = sorted(((k, len(v), sum(v)) for k, v in grouped.items()), key=lambda t: -t[2])[:pairs]
    largest = sorted(gaps, key=lambda g: -g.us)[:top]
    return GapReport(running_end - device[0].start, busy, dict(idle), by_pair, largest)
