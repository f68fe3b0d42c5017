"""AsyncLLM with the engine core in a child process: start-up errors, child death, no weights here."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from engine_helpers import PROMPTS

from gpu_worker import EngineConfig, SamplingParams
from gpu_worker.engine.async_llm import AsyncLLM
from gpu_worker.engine.async_llm_proc import AsyncLLMProc
from gpu_worker.engine.errors import EngineDeadError


@pytest.fixture(scope="module")
def llama_dir(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("llama")


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
