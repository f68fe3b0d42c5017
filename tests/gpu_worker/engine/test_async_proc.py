"""AsyncLLM with the engine core in a child process: start-up errors, child death, no weights here."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from gpu_worker import EngineConfig, SamplingParams
from gpu_worker.core.types import EngineCoreOutput, FinishReason, SchedulerStats, TokenLogprobs
from gpu_worker.engine.async_llm import AsyncLLM
from gpu_worker.engine.async_llm_proc import AsyncLLMProc
from gpu_worker.engine.core_proc import PackedOutputs, _StatsGate
from gpu_worker.engine.errors import EngineDeadError
from tests.gpu_worker.engine.engine_helpers import PROMPTS


@pytest.fixture(scope="module")
def llama_dir(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("llama")


def test_packed_outputs_round_trip() -> None:
    outputs = [
        EngineCoreOutput("a", (5,), num_cached_tokens=16),
        EngineCoreOutput("b", (7,), new_logprobs=(TokenLogprobs(7, -0.5, 1, ((7, -0.5), (3, -1.5))),)),
        EngineCoreOutput("c", (2,), finish_reason=FinishReason.STOP, num_cached_tokens=3, stop_token_id=2),
        EngineCoreOutput("d", (), finish_reason=FinishReason.ABORT),
        EngineCoreOutput("e", (9, 10), finish_reason=FinishReason.LENGTH),
    ]
    packed = pickle.loads(pickle.dumps(PackedOutputs.pack(outputs)))
    assert len(packed) == 5
    assert [row for row, *_ in packed.extras] == [1, 2, 3, 4]  # "a" has nothing beyond the columns
    assert packed.unpack() == outputs
    assert PackedOutputs.pack([]).unpack() == []


def test_stats_gate_sends_changes_events_idle_and_periodically(monkeypatch: pytest.MonkeyPatch) -> None:
    import gpu_worker.engine.core_proc as core_proc

    now = [100.0]
    monkeypatch.setattr(core_proc.time, "monotonic", lambda: now[0])
    gate = _StatsGate()
    stats = SchedulerStats(4, 0, 0.1, 90, 100)
    assert gate.should_send(stats, eventful=False, idle=False)  # first snapshot
    assert not gate.should_send(stats, eventful=False, idle=False)  # unchanged, too soon
    assert gate.should_send(stats, eventful=True, idle=False)  # adds / failures / replies
    assert gate.should_send(SchedulerStats(3, 0, 0.1, 90, 100), eventful=False, idle=False)  # counts changed
    assert gate.should_send(SchedulerStats(3, 0, 0.1, 90, 100), eventful=False, idle=True)  # final state
    now[0] += core_proc._STATS_INTERVAL_S / 2
    assert not gate.should_send(SchedulerStats(3, 0, 0.2, 80, 100), eventful=False, idle=False)  # kv only
    now[0] += core_proc._STATS_INTERVAL_S
    assert gate.should_send(SchedulerStats(3, 0, 0.2, 80, 100), eventful=False, idle=False)  # periodic


def test_load_error_propagates(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(Exception, match="no-such-model"):
        AsyncLLM.from_config(EngineConfig(model=str(missing), device="cpu", engine_core_process=True))


async def test_killed_child_fails_requests(llama_dir: Path) -> None:
    config = EngineConfig(model=str(llama_dir), num_kv_blocks=64, max_num_seqs=32, engine_core_process=True)
    engine = AsyncLLM.from_config(config)
    assert isinstance(engine, AsyncLLMProc)
    assert not hasattr(engine, "_core")  # the parent holds no EngineCore (no model weights)
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    started = asyncio.Event()

    async def consume(prompt: str, rid: str) -> None:
        async for _ in engine.generate(prompt, params, rid):
            started.set()

    tasks = [asyncio.create_task(consume(p, f"k{i}")) for i, p in enumerate(PROMPTS[:3])]
    await asyncio.wait_for(started.wait(), 60)
    pid = engine._proc.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    assert all(isinstance(r, EngineDeadError) for r in results), results
    with pytest.raises(EngineDeadError):
        await engine.generate(PROMPTS[0], params, "after").__anext__()
    with pytest.raises(EngineDeadError):
        engine.cached_block_hashes()
    await engine.shutdown()
