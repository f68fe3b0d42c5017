"""What speculative decoding adds to the step plan and result survives their byte messages (a
pipeline's ranks are other processes), and reaches the worker's Prometheus counters."""

from __future__ import annotations

import numpy as np
from prometheus_client import generate_latest

from gpu_worker.core.types import (
    GrammarBitmask,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    SchedulerStats,
    SpecDecodeStats,
    TokenLogprobs,
)
from gpu_worker.executor.step_message import decode_output, decode_step, encode_output, encode_step
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.server.engine_metrics import EngineMetrics


def test_plan_with_drafts_round_trip() -> None:
    new = ScheduledRequest("a", (1, 2, 3), 0, (4,), True, is_new=True, params=SamplingParams(), prompt_len=3)
    spec = ScheduledRequest("b", (9, 10, 11, 12), 40, (7,), True, num_draft_tokens=3)
    mask = (np.arange(5 * 2, dtype=np.int32).reshape(5, 2) - 4)
    plan = SchedulerOutput((new, spec), 7, grammar=GrammarBitmask(("a", "b"), mask, row_counts=(1, 4)))
    got = decode_step(encode_step(plan))
    assert got.requests == plan.requests and got.requests[1].num_draft_tokens == 3
    assert got.grammar is not None and got.grammar.row_counts == (1, 4)
    assert np.array_equal(got.grammar.bitmask, mask)
    plain = SchedulerOutput((new,), 3, grammar=GrammarBitmask(("a",), mask[:1]))
    again = decode_step(encode_step(plain)).grammar
    assert again is not None and again.row_counts == ()


def test_result_with_accepted_drafts_round_trip() -> None:
    lp = TokenLogprobs(7, -0.5, 1, ((7, -0.5), (3, -1.5)))
    out = RunnerOutput(
        ("a", "b"), (5, 7), (None, lp),
        accepted_draft_ids=((), (4, 6)),
        accepted_logprobs=((), (TokenLogprobs(4, -0.1, 1), TokenLogprobs(6, -0.2, 2, ((1, -0.05),)))),
    )
    assert decode_output(encode_output(out)) == out


def test_worker_exports_spec_decode_counters() -> None:
    stats = [SchedulerStats(0, 0, 0.0, 8, 8, spec_decode=SpecDecodeStats(4, 12, 7, (4, 2, 1))),
             SchedulerStats(0, 0, 0.0, 8, 8, spec_decode=SpecDecodeStats(6, 18, 10, (5, 3, 1, 1)))]
    metrics = EngineMetrics("m", lambda: stats[0])
    metrics.refresh()
    stats.pop(0)
    text = generate_latest(metrics.metrics.registry).decode()  # scraping refreshes too
    assert 'llmserve:spec_decode_num_drafts_total{model_name="m"} 6.0' in text
    assert 'llmserve:spec_decode_num_draft_tokens_total{model_name="m"} 18.0' in text
    assert 'llmserve:spec_decode_num_accepted_tokens_total{model_name="m"} 10.0' in text
    name = "llmserve:spec_decode_num_accepted_tokens_per_pos_total"
    for position, value in enumerate((5, 3, 1, 1)):
        assert f'{name}{{model_name="m",position="{position}"}} {value}.0' in text
