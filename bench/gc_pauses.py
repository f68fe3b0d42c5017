"""The cyclic garbage collector's pauses during a timed run (``gc.callbacks``).

A full (generation 2) collection walks every tracked object of the process; with a model
loaded that can stall one engine step for hundreds of milliseconds (DECISIONS 157). The serving
entry points freeze startup's objects (``llmserve.gc_tuning``) so collections skip them; the
benches record what the collector did while they timed, so a row shows whether a pause fell
inside it.
"""

from __future__ import annotations

import gc
import time
from types import TracebackType
from typing import Any


class GcPauses:
    """Context manager: counts collections per generation and their pause times while open."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.pauses_ms: list[float] = []
        self.full_pauses_ms: list[float] = []
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        pause = (time.perf_counter() - self._start) * 1e3
        generation = int(info["generation"])
        self.counts[generation] += 1
        self.pauses_ms.append(pause)
        if generation == 2:
            self.full_pauses_ms.append(pause)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        gc.callbacks.remove(self._callback)

    def fields(self) -> dict[str, Any]:
        """Row fields: collections per generation, full collections, the longest and total pause."""
        return dict(gc_collections="/".join(map(str, self.counts)), gc_full_collections=self.counts[2],
                    gc_max_pause_ms=round(max(self.pauses_ms, default=0.0), 2),
                    gc_pause_ms=round(sum(self.pauses_ms), 2),
                    gc_frozen_objects=gc.get_freeze_count())
