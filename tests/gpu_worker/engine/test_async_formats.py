"""AsyncLLM parses a structured-output format it has not seen on its format-check thread: the
event loop serves other requests meanwhile, requests with the same format share one parse, a
format that does not parse fails its own request only, and a parsed format is not parsed again."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_worker import EngineConfig, SamplingParams
from gpu_worker.engine import async_llm as async_llm_module
from gpu_worker.engine.async_llm import AsyncLLM
from gpu_worker.engine.errors import EngineClosedError
from gpu_worker.outputs import RequestOutput
from gpu_worker.sampling_params import StructuredOutputsParams


@pytest.fixture()
def engine(tiny_model: Callable[[str], Path]) -> Iterator[AsyncLLM]:
    config = EngineConfig(model=str(tiny_model("llama")), num_kv_blocks=64, max_num_seqs=8)
    engine = AsyncLLM.from_config(config)
    yield engine
    asyncio.run(engine.shutdown())


class HeldParses:
    """The real parse, on whatever thread runs it, held until :attr:`release` is set."""

    def __init__(self, parse: Callable[[StructuredOutputsParams], None]) -> None:
        self._parse = parse
        self.release = threading.Event()
        self.calls: list[tuple[str, str]] = []  # (thread name, format key)

    def __call__(self, spec: StructuredOutputsParams) -> None:
        self.calls.append((threading.current_thread().name, spec.key[1]))
        assert self.release.wait(60)
        self._parse(spec)


@pytest.fixture()
def held(monkeypatch: pytest.MonkeyPatch) -> HeldParses:
    held = HeldParses(async_llm_module.check_syntax)
    monkeypatch.setattr(async_llm_module, "check_syntax", held)
    return held


async def collect(engine: AsyncLLM, params: SamplingParams, rid: str) -> list[RequestOutput]:
    return [out async for out in engine.generate("Name a thing:", params, rid)]


def regex(pattern: str) -> SamplingParams:
    return SamplingParams(max_tokens=8, structured_output={"regex": pattern})


async def test_the_loop_serves_others_while_a_new_format_is_parsed(
        engine: AsyncLLM, held: HeldParses) -> None:
    constrained = [asyncio.create_task(collect(engine, regex("[a-z]{3}"), f"c{i}")) for i in range(3)]
    plain = await collect(engine, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), "plain")
    assert plain[-1].finished  # served while the parse is held on the other thread
    assert not any(task.done() for task in constrained)
    held.release.set()
    outputs = await asyncio.gather(*constrained)
    for stream in outputs:
        assert len("".join(o.outputs[0].text for o in stream)) == 3
    assert held.calls == [("format-check_0", "[a-z]{3}")]  # one parse for the three, off the loop
    await collect(engine, regex("[a-z]{3}"), "again")
    assert len(held.calls) == 1  # remembered as parsed


async def test_a_format_that_does_not_parse_fails_only_its_request(
        engine: AsyncLLM, held: HeldParses) -> None:
    held.release.set()
    good = asyncio.create_task(collect(engine, regex("[0-9]{2}"), "good"))
    with pytest.raises(ValueError, match=r"structured_output.regex does not compile"):
        await collect(engine, regex("[a-z"), "bad")
    assert "".join(o.outputs[0].text for o in await good).isdigit()
    with pytest.raises(ValueError, match=r"structured_output.regex does not compile"):
        await collect(engine, regex("[a-z"), "bad-again")  # an invalid format is parsed each time
    assert [key for _, key in held.calls].count("[a-z") == 2


async def test_a_request_cancelled_during_the_parse_leaves_it_to_the_others(
        engine: AsyncLLM, held: HeldParses) -> None:
    first = asyncio.create_task(collect(engine, regex("x{2}"), "first"))
    second = asyncio.create_task(collect(engine, regex("x{2}"), "second"))
    while not held.calls:
        await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.05)
    held.release.set()
    assert "".join(o.outputs[0].text for o in await second) == "xx"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert len(held.calls) == 1


async def test_a_shutdown_during_the_parse_ends_the_waiting_request(
        engine: AsyncLLM, held: HeldParses) -> None:
    queued = [asyncio.create_task(collect(engine, regex(p), p)) for p in ("a{2}", "b{2}")]
    while not held.calls:
        await asyncio.sleep(0.01)
    closing = asyncio.create_task(engine.shutdown())
    await asyncio.sleep(0.05)
    held.release.set()
    await closing
    results: list[Any] = await asyncio.gather(*queued, return_exceptions=True)
    # the parse already running finishes, then the closed engine refuses its request; the one
    # still queued on the format-check thread is cancelled with the pool
    assert all(isinstance(r, EngineClosedError) for r in results), results
