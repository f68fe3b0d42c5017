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
from gpu_worker.core.types import (
    EngineCoreOutput,
    EngineCoreRequest,
    FinishReason,
    SchedulerStats,
    TokenLogprobs,
)
from gpu_worker.engine.async_llm import AsyncLLM
from gpu_worker.engine.core import EngineCore
from gpu_worker.engine.core_client import ProcessCoreClient
from gpu_worker.engine.core_messages import AddRequest, PackedOutputs, StepResult
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
    assert len(packed.request_ids) == 5
    assert [row for row, *_ in packed.extras] == [1, 2, 3, 4]  # "a" has nothing beyond the columns
    assert packed.unpack() == outputs
    assert PackedOutputs.pack([]).unpack() == []
    # A StepResult crosses the pipe with its outputs packed, and arrives equal.
    result = StepResult(outputs, SchedulerStats(1, 2, 0.5, 10, 20), [], num_applied_adds=3)
    assert pickle.loads(pickle.dumps(result)) == result


def test_stats_reported_on_changes_events_idle_and_periodically(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpu_worker.engine.core as core_module

    core = EngineCore(EngineConfig(model=str(llama_dir), num_kv_blocks=64, max_num_seqs=4))
    now = [100.0]
    monkeypatch.setattr(core_module.time, "monotonic", lambda: now[0])
    first = core.run_once([])
    assert first is not None and first.stats is not None  # first snapshot (and idle)
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    requests = [core_request(core, f"r{i}", params) for i in range(2)]
    added = core.run_once([AddRequest("r", tuple(requests))])
    assert added is not None and added.stats is not None and added.stats.num_running == 2  # eventful
    assert added.num_applied_adds == 2 and not added.failed_adds
    steady = core.run_once([])  # same counts, too soon: held back
    assert steady is not None and steady.stats is None and steady.outputs
    now[0] += 1.5 * core_module._STATS_INTERVAL_S
    periodic = core.run_once([])
    assert periodic is not None and periodic.stats is not None  # at least every interval
    assert periodic.stats.extra["engine_steps"] == 3.0
    aborted = core.run_once([])
    core.abort(["r0", "r1"])
    final = core.run_once([])
    assert aborted is not None and final is not None and final.stats is not None  # idle: always sent
    assert final.stats.num_running == 0 and not core.has_unfinished()


def core_request(core: EngineCore, rid: str, params: SamplingParams) -> EngineCoreRequest:
    from gpu_worker.engine.processor import InputProcessor

    processor = InputProcessor(core.tokenizer, core.vocab_size, core.max_model_len, core.eos_token_ids)
    return processor.process(rid, PROMPTS[0], params).core_requests[0]


def test_load_error_propagates(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(Exception, match="no-such-model"):
        AsyncLLM.from_config(EngineConfig(model=str(missing), device="cpu", engine_core_process=True))


async def test_killed_child_fails_requests(llama_dir: Path) -> None:
    config = EngineConfig(model=str(llama_dir), num_kv_blocks=64, max_num_seqs=32, engine_core_process=True)
    engine = AsyncLLM.from_config(config)
    assert isinstance(engine.client, ProcessCoreClient)
    assert not hasattr(engine.client, "core")  # the parent holds no EngineCore (no model weights)
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)  # up to the context
    started = asyncio.Event()

    async def consume(prompt: str, rid: str) -> None:
        async for _ in engine.generate(prompt, params, rid):
            started.set()

    tasks = [asyncio.create_task(consume(p, f"k{i}")) for i, p in enumerate(PROMPTS[:3])]
    await asyncio.wait_for(started.wait(), 60)
    pid = engine.client.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    assert all(isinstance(r, EngineDeadError) for r in results), results
    with pytest.raises(EngineDeadError):
        await engine.generate(PROMPTS[0], params, "after").__anext__()
    with pytest.raises(EngineDeadError):
        await engine.cached_block_hashes()
    await engine.shutdown()
