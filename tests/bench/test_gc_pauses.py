"""bench/gc_pauses.py: the collector's pauses recorded while a run is timed."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from gc_pauses import GcPauses  # noqa: E402


def test_full_collections_and_their_pauses_are_counted_while_open_only() -> None:
    before = list(gc.callbacks)
    with GcPauses() as pauses:
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        gc.collect()  # a full collection inside the timed region
        gc.collect(0)
    fields = pauses.fields()
    assert gc.callbacks == before  # the callback is gone after the run
    assert fields["gc_full_collections"] >= 1 and pauses.counts[0] >= 1
    assert fields["gc_collections"].count("/") == 2
    assert 0.0 <= fields["gc_max_pause_ms"] <= fields["gc_pause_ms"]
    assert len(pauses.full_pauses_ms) == pauses.counts[2]
    gc.collect()  # after the run: not counted
    assert pauses.fields()["gc_full_collections"] == fields["gc_full_collections"]
