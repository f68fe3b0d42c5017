"""Priority scheduling through the engine (tiny llama): a high-priority request submitted into a
saturated engine gets its first token before the lower-priority ones queued before it; with FCFS
it waits its turn; the offline API takes one priority per prompt."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gpu_worker import LLM, EngineConfig, SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.output_processor import OutputKind


@pytest.fixture(scope="module")
def llama_dir(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("llama")


def first_token_order(llama_dir: Path, policy: str) -> list[str]:
    engine = LLMEngine.from_config(EngineConfig(model=str(llama_dir), num_kv_blocks=64, max_num_seqs=2,
                                                scheduling_policy=policy))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for rid in ("run1", "run2", "low1", "low2"):
        engine.add_request(rid, f"request {rid}", params, kind=OutputKind.DELTA, priority=1)
    order: list[str] = []
    for output in engine.step():  # run1 and run2 fill the engine; low1, low2 wait
        order.append(output.request_id)
    engine.add_request("high", "request high", params, kind=OutputKind.DELTA, priority=0)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id not in order:
                order.append(output.request_id)
    return order


def test_high_priority_request_gets_its_first_token_before_queued_lower_ones(llama_dir: Path) -> None:
    assert first_token_order(llama_dir, "priority") == ["run1", "run2", "high", "low1", "low2"]


def test_fcfs_serves_in_arrival_order_whatever_the_priority(llama_dir: Path) -> None:
    assert first_token_order(llama_dir, "fcfs") == ["run1", "run2", "low1", "low2", "high"]


def test_offline_generate_takes_a_priority_per_prompt(llama_dir: Path) -> None:
    llm = LLM(model=str(llama_dir), num_kv_blocks=64, max_num_seqs=1, scheduling_policy="priority")
    params = SamplingParams(max_tokens=2, temperature=0.0)
    outs = llm.generate(["a", "b", "c"], params, priority=[2, 0, 1])
    assert [o.prompt for o in outs] == ["a", "b", "c"]  # results stay in input order
    assert all(len(o.outputs[0].token_ids) == 2 for o in outs)
    with pytest.raises(ValueError, match="priority has 2 entries for 3 prompts"):
        llm.generate(["a", "b", "c"], params, priority=[0, 1])
