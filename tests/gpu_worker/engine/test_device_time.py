"""Device seconds per request through the engine: the core measures each step, the output
processor sums a request's shares, the process pipe carries them (docs/OBSERVABILITY.md, "Cost")."""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu_worker import LLM, SamplingParams
from gpu_worker.core.types import EngineCoreOutput, FinishReason
from gpu_worker.engine.core_messages import PackedOutputs
from gpu_worker.engine.output_processor import OutputKind, OutputProcessor, merge_deltas
from gpu_worker.engine.processor import InputProcessor
from tests.gpu_worker.engine.engine_helpers import PROMPTS


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_every_request_carries_its_share_and_the_shares_tile_the_busy_time(
    tiny_model: Callable[[str], Path], async_scheduling: bool
) -> None:
    llm = LLM(model=str(tiny_model("llama")), num_kv_blocks=128, max_num_seqs=8,
              async_scheduling=async_scheduling)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(PROMPTS, params)
        wall_s = time.perf_counter() - start
        shares = [o.device_s for o in outputs]
        assert all(s > 0 for s in shares), shares
        total = llm.engine.stats().device_seconds
        # Every second the core measured went to a request (none ended early, so nothing dropped)...
        assert sum(shares) == pytest.approx(total, rel=1e-9)
        # ...and overlapping async steps are not counted twice: the shares fit in the wall time.
        assert total <= wall_s
        # Longer prompts computed more tokens in the same steps: they got more of the time.
        by_prompt = dict(zip(PROMPTS, shares, strict=True))
        assert by_prompt[PROMPTS[2]] > by_prompt[PROMPTS[0]]
    finally:
        llm.shutdown()


def test_output_processor_sums_shares_per_request_across_samples(smollm2_tokenizer: Any) -> None:
    processor = InputProcessor(smollm2_tokenizer, 49152, max_model_len=64, eos_token_ids=frozenset({2}))
    outputs = OutputProcessor(smollm2_tokenizer)
    request = processor.process("r", [5, 6, 7], SamplingParams(n=2, max_tokens=2))
    outputs.add_request(request, OutputKind.DELTA)
    first = outputs.process_outputs([EngineCoreOutput("r#0", (10,), device_s=0.25),
                                     EngineCoreOutput("r#1", (11,), device_s=0.5)]).request_outputs
    assert [o.device_s for o in first] == [0.75]
    last = outputs.process_outputs([
        EngineCoreOutput("r#0", (12,), finish_reason=FinishReason.LENGTH, device_s=0.125),
        EngineCoreOutput("r#1", (13,), finish_reason=FinishReason.LENGTH, device_s=0.125),
    ]).request_outputs
    assert [o.device_s for o in last] == [1.0]  # cumulative, even in delta outputs
    assert merge_deltas(first[0], last[0]).device_s == 1.0


def test_a_stop_string_ends_the_request_with_the_shares_reported_so_far(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    processor = InputProcessor(tok, 49152, max_model_len=64, eos_token_ids=frozenset({2}))
    outputs = OutputProcessor(tok)
    ids = tok.encode(" stop here")
    outputs.add_request(processor.process("s", [5, 6], SamplingParams(max_tokens=20, stop=["here"])),
                        OutputKind.FINAL_ONLY)
    done = outputs.process_outputs([EngineCoreOutput("s", tuple(ids), device_s=0.3)])
    (final,) = done.request_outputs
    assert final.finished and final.device_s == pytest.approx(0.3)
    assert done.reqs_to_abort == ["s"]
    # The core's abort output arrives later; the request is over, so nothing changes.
    abort = EngineCoreOutput("s", (), finish_reason=FinishReason.ABORT, device_s=0.1)
    late = outputs.process_outputs([abort])
    assert late.request_outputs == []


def test_packed_outputs_carry_device_seconds() -> None:
    outputs = [EngineCoreOutput("a", (5,), device_s=0.001),
               EngineCoreOutput("b", (), finish_reason=FinishReason.ABORT, device_s=0.25)]
    packed = pickle.loads(pickle.dumps(PackedOutputs.pack(outputs)))
    assert packed.unpack() == outputs
