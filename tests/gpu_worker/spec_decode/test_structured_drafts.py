"""Structured output with drafts: drafts are cut at the first token the grammar forbids, each
verified position gets its own mask row, and the matcher ends where it began (rolled back)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpu_worker.core.request import Request
from gpu_worker.core.types import EngineCoreRequest, ScheduledRequest, SchedulerOutput
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.structured.manager import StructuredOutputManager

VOCAB = 49152


def allowed(row: np.ndarray, token_id: int) -> bool:
    return bool((int(row[token_id // 32]) >> (token_id % 32)) & 1)


@pytest.fixture(scope="module")
def manager(smollm2_tokenizer: Any) -> StructuredOutputManager:
    return StructuredOutputManager(smollm2_tokenizer, VOCAB, [2])


def test_drafts_cut_and_masks_per_position(manager: StructuredOutputManager, smollm2_tokenizer: Any) -> None:
    a, b, x = (smollm2_tokenizer.convert_tokens_to_ids(t) for t in ("a", "b", "x"))
    regex: Any = {"regex": "(ab)+x"}
    params = SamplingParams(max_tokens=10, structured_output=regex)
    core = EngineCoreRequest("r", (1, 2, 3), params, eos_token_ids=frozenset({2}))
    manager.add(core)
    manager.cache.get(params.structured_output).result()  # type: ignore[arg-type]  # compiled
    request = Request.from_core_request(core, 16, "m")
    request.append_output_token(a)  # the scheduler has accepted "a"
    # After "a": "b" fits, then "a", then "a" again does not ("aba" + "a").
    assert manager.validate_drafts([request], [[b, a, a, b]]) == [[b, a]]
    assert manager.validate_drafts([request], [[x]]) == [[]]
    plain = Request("p", (1,), SamplingParams(), block_size=16, hash_seed="m")
    assert manager.validate_drafts([plain], [[x, x]]) == [[x, x]]  # unconstrained: untouched

    step = SchedulerOutput((ScheduledRequest("r", (a, b, a), 4, (), True, num_draft_tokens=2),), 3)
    grammar = manager.prepare_step(step, lambda rid: request).grammar
    assert grammar is not None and grammar.row_counts == (3,)
    rows = grammar.bitmask
    assert allowed(rows[0], b) and not allowed(rows[0], a)  # after "a"
    assert allowed(rows[1], a) and allowed(rows[1], x) and not allowed(rows[1], b)  # after "ab"
    assert allowed(rows[2], b) and not allowed(rows[2], a) and not allowed(rows[2], x)  # after "aba"
    # Rolled back: the next step's mask is again the one after "a".
    again = manager.prepare_step(SchedulerOutput((ScheduledRequest("r", (a,), 4, (), True),), 1),
                                 lambda rid: request).grammar
    assert again is not None and np.array_equal(again.bitmask[0], rows[0]) and again.row_counts == ()
