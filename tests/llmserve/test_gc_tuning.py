"""llmserve.gc_tuning: the objects alive when a run starts are kept out of the collector's walks
for its length only, and a heap frozen by its owner stays frozen."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu_worker import LLM, SamplingParams
from llmserve.gc_tuning import objects_frozen


@pytest.fixture(autouse=True)
def _unfrozen() -> Any:
    """Each test starts and ends with nothing frozen (an in-process server test of this session
    may have frozen its startup objects)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_objects_alive_at_the_start_are_frozen_inside_and_handed_back_after() -> None:
    survivor = [object() for _ in range(100)]
    with objects_frozen():
        frozen = gc.get_freeze_count()
        assert frozen >= len(survivor)
        made_inside: list[object] = []
        made_inside.append(made_inside)  # a cycle made inside: still collectable
        del made_inside
        assert gc.collect() >= 1
        # nothing made inside is frozen; frozen objects freed meanwhile (a leftover thread of an
        # earlier test drops its last reference) only lower the count
        assert 0 < gc.get_freeze_count() <= frozen
    assert gc.get_freeze_count() == 0


def test_an_exception_still_hands_the_objects_back() -> None:
    with pytest.raises(RuntimeError), objects_frozen():
        assert gc.get_freeze_count() > 0
        raise RuntimeError("inside the run")
    assert gc.get_freeze_count() == 0


def test_a_heap_frozen_by_its_owner_stays_frozen() -> None:
    gc.freeze()  # as a serving entry point does at startup
    owner = gc.get_freeze_count()
    # Tracked objects made after the owner's freeze: a second freeze inside would take them too.
    # Frozen objects freed meanwhile (by this thread or a leftover one of an earlier test) only
    # lower the count, so the checks are bounds: nothing added inside, nothing handed back after.
    made_after = [[] for _ in range(1000)]
    with objects_frozen():
        assert 0 < gc.get_freeze_count() <= owner
    assert 0 < gc.get_freeze_count() <= owner
    assert len(made_after) == 1000


def test_generate_runs_with_the_callers_objects_frozen_and_returns_them(
        tiny_model: Callable[[str], Path]) -> None:
    llm = LLM(model=str(tiny_model("llama")), num_kv_blocks=64, max_num_seqs=4)
    counts: list[int] = []
    step = llm.engine.step

    def counting_step() -> Any:  # the engine's own step, the freeze count noted
        counts.append(gc.get_freeze_count())
        return step()

    llm.engine.step = counting_step  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = llm.generate([[1, 2, 3], [4, 5]], params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
    assert counts and all(c > 0 for c in counts), counts
    assert gc.get_freeze_count() == 0
    llm.shutdown()
