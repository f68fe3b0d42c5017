"""AsyncLLM: streamed deltas equal offline results, cancellation frees KV, errors never hang."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

from gpu_worker import LLM, EngineConfig, SamplingParams
from gpu_worker.engine.async_llm import AsyncLLM
from gpu_worker.engine.errors import EngineClosedError, EngineDeadError, QueueFullError
from gpu_worker.outputs import RequestOutput
from llmserve.kv_events import BlockStored
from llmserve.prompt_input import ChatPrompt
from tests.gpu_worker.engine.engine_helpers import PROMPTS

MULTIBYTE = "😀🎉世界Привет"


@pytest.fixture(scope="module")
def llama_dir(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module", params=["thread", "process"])
def engine(llama_dir: Path, request: pytest.FixtureRequest) -> Iterator[AsyncLLM]:
    """The engine core on a thread, and in a child process planning one step ahead (CUDA's
    defaults): every test below holds for both."""
    in_process = request.param == "process"
    config = EngineConfig(
        model=str(llama_dir), num_kv_blocks=64, max_num_seqs=32,
        engine_core_process=in_process, async_scheduling=in_process,
    )
    engine = AsyncLLM.from_config(config)
    yield engine
    asyncio.run(engine.shutdown())


def multibyte_params(tokenizer: Any, **kw: Any) -> SamplingParams:
    """Greedy, biased towards tokens that hold pieces of multi-byte characters."""
    bias = {t: 30.0 for t in tokenizer.encode(MULTIBYTE)}
    return SamplingParams(temperature=0.0, logit_bias=bias, ignore_eos=True, **kw)


async def collect(engine: AsyncLLM, prompt: Any, params: SamplingParams, rid: str) -> list[RequestOutput]:
    return [out async for out in engine.generate(prompt, params, rid)]


async def wait_idle(engine: AsyncLLM) -> None:
    """Wait until the core thread has applied everything (aborts included) and holds no KV."""
    for _ in range(1000):
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine did not go idle: {engine.stats()}")


async def test_stream_deltas_equal_offline(engine: AsyncLLM, llama_dir: Path) -> None:
    tok = engine.tokenizer
    cases = [(p, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)) for p in PROMPTS]
    cases.append((PROMPTS[1], multibyte_params(tok, max_tokens=30)))
    cases.append((PROMPTS[2], multibyte_params(tok, max_tokens=30, n=2, stop=["界"])))
    streams = await asyncio.gather(*(collect(engine, p, sp, f"s{i}") for i, (p, sp) in enumerate(cases)))
    offline_llm = LLM(model=str(llama_dir), num_kv_blocks=64, max_num_seqs=32)
    offline = offline_llm.generate([p for p, _ in cases], [sp for _, sp in cases])
    split_chars = 0
    for stream, expected in zip(streams, offline, strict=True):
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        for index, completion in enumerate(expected.outputs):
            deltas = [c for o in stream for c in o.outputs if c.index == index]
            assert "".join(d.text for d in deltas) == completion.text
            assert [t for d in deltas for t in d.token_ids] == completion.token_ids
            assert all(not d.text.endswith("\ufffd") for d in deltas[:-1])  # never half a character
            assert deltas[-1].finish_reason == completion.finish_reason
            split_chars += sum("\ufffd" in tok.decode([t]) for t in completion.token_ids)
    assert split_chars > 0  # characters really were split across tokens
    assert engine.num_in_flight == 0
    extra = engine.stats().extra
    assert extra["engine_steps"] >= 30 and extra["engine_step_time_s"] > 0
    await wait_idle(engine)


async def test_consumer_leaving_early_aborts(engine: AsyncLLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    async with aclosing(engine.generate(PROMPTS[2], params, "early")) as stream:
        async for _ in stream:
            break
    assert engine.num_in_flight == 0
    await wait_idle(engine)

    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(PROMPTS[3], params, "cancelled"):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(engine)


async def test_abort_ends_stream(engine: AsyncLLM) -> None:
    outputs: list[RequestOutput] = []
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    async for out in engine.generate(PROMPTS[1], params, "to-abort"):
        outputs.append(out)
        if len(outputs) == 1:
            await engine.abort("to-abort")
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    await wait_idle(engine)


async def test_invalid_input_fails_alone(engine: AsyncLLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    good = asyncio.gather(*(collect(engine, p, params, f"g{i}") for i, p in enumerate(PROMPTS)))
    with pytest.raises(ValueError, match="^prompt_token_ids"):
        await collect(engine, [1, 10**6], params, "bad-ids")
    with pytest.raises(ValueError, match="^messages"):
        await collect(engine, ChatPrompt([]), params, "bad-chat")
    results = await good
    # A consumer that lags gets its waiting deltas merged (AsyncLLM's contract), so only the
    # totals and the finish are fixed, not how many tokens each chunk holds.
    assert all(r[-1].finished and r[-1].outputs[0].finish_reason == "length" for r in results)
    assert all(not o.finished for r in results for o in r[:-1])
    assert [sum(len(o.outputs[0].token_ids) for o in r) for r in results] == [8] * len(PROMPTS)
    events = engine.take_kv_events()
    assert any(isinstance(e, BlockStored) for e in events) and engine.take_kv_events() == []
    assert await engine.cached_block_hashes()
    await wait_idle(engine)


@pytest.mark.parametrize("in_process", [False, True], ids=["thread", "process"])
async def test_queue_full_and_shutdown(llama_dir: Path, in_process: bool) -> None:
    config = EngineConfig(
        model=str(llama_dir), num_kv_blocks=64, max_num_seqs=1, max_queue_len=2,
        engine_core_process=in_process,
    )
    engine = AsyncLLM.from_config(config)
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)  # outlives the test
    running = engine.generate(PROMPTS[0], params, "r0")
    await running.__anext__()  # r0 runs; the next two wait (max_num_seqs=1)
    waiting = [engine.generate(PROMPTS[0], params, f"r{i}") for i in (1, 2)]
    tasks = [asyncio.ensure_future(w.__anext__()) for w in waiting]
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError):
        await engine.generate(PROMPTS[0], params, "r3").__anext__()
    await engine.shutdown()
    for task in tasks:
        with pytest.raises(EngineClosedError):
            await task
    with pytest.raises(EngineClosedError):
        async for out in running:  # deltas made before the shutdown may still come first
            assert not out.finished
    with pytest.raises(EngineClosedError):
        await engine.generate(PROMPTS[0], params, "late").__anext__()


async def test_failed_step_fails_requests(llama_dir: Path) -> None:
    engine = AsyncLLM.from_config(EngineConfig(model=str(llama_dir), num_kv_blocks=64, max_num_seqs=32))
    runner = engine.client.core.runner  # type: ignore[attr-defined]
    execute, calls = runner.execute_async, []

    def failing_execute(sched_out: Any) -> Any:  # fault injection: the 4th step raises
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("device lost")
        return execute(sched_out)

    runner.execute_async = failing_execute  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    results = await asyncio.gather(
        *(collect(engine, p, params, f"f{i}") for i, p in enumerate(PROMPTS[:3])), return_exceptions=True
    )
    assert all(isinstance(r, EngineDeadError) for r in results), results
    with pytest.raises(EngineDeadError):
        await collect(engine, PROMPTS[0], params, "after")
    await engine.shutdown()
