"""Async scheduling end to end on a real (tiny) model: every sampling feature gives the same
tokens, logprobs and finish reasons as the synchronous engine, and steps really overlap."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu_worker import LLM, SamplingParams
from gpu_worker.core.types import PLACEHOLDER_TOKEN_ID, SchedulerOutput
from tests.gpu_worker.engine.engine_helpers import PROMPTS


@pytest.fixture(scope="module")
def llama_dir(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("llama")


def cases(eos_prone: int) -> list[SamplingParams]:
    """One request per sampling feature (``eos_prone``: a token the greedy run emits early)."""
    return [
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[eos_prone]),
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[eos_prone], min_tokens=12),
        SamplingParams(
            temperature=0.0, max_tokens=20, ignore_eos=True,
            repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2,
        ),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=7, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, min_p=0.05, seed=3, n=2, max_tokens=12, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logit_bias={5: 3.0, 9: 2.0}),
    ]


def summary(outputs: list[Any]) -> list[list[tuple[Any, ...]]]:
    """Tokens, text, finish reason and each logprob entry's token ids and ranks, exactly."""
    return [
        [
            (
                c.token_ids, c.text, c.finish_reason,
                [{t: lp.rank for t, lp in e.items()} for e in c.logprobs or []],
            )
            for c in o.outputs
        ]
        for o in outputs
    ]


def logprob_values(outputs: list[Any]) -> list[float]:
    return [lp.logprob for o in outputs for c in o.outputs for e in c.logprobs or [] for lp in e.values()]


def test_async_scheduling_equals_sync_for_every_sampling_feature(llama_dir: Path) -> None:
    sync_llm = LLM(model=str(llama_dir), num_kv_blocks=64, max_num_seqs=32, async_scheduling=False)
    async_llm = LLM(model=str(llama_dir), num_kv_blocks=64, max_num_seqs=32, async_scheduling=True)
    assert async_llm.engine.core.async_scheduling and not sync_llm.engine.core.async_scheduling
    probe = sync_llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    params = cases(eos_prone=probe[0].outputs[0].token_ids[5])
    # The stop-token cases (2 and 3) use the probe's prompt, so their stop token does come.
    prompts = [PROMPTS[1] if i in (2, 3) else PROMPTS[i % len(PROMPTS)] for i in range(len(params))]

    planned: list[SchedulerOutput] = []
    runner = async_llm.engine.core.runner
    launch = runner.execute_async

    def recording(sched: SchedulerOutput) -> Any:
        planned.append(sched)
        return launch(sched)

    runner.execute_async = recording  # type: ignore[method-assign]
    sync_out, async_out = sync_llm.generate(prompts, params), async_llm.generate(prompts, params)
    expected = summary(sync_out)
    assert summary(async_out) == expected
    # The steps batch different rows together in the two modes: float32 matmul noise only.
    assert logprob_values(async_out) == pytest.approx(logprob_values(sync_out), abs=1e-5)
    reasons = {c[2] for o in expected for c in o}
    assert reasons == {"length", "stop"}  # both endings were exercised
    # Decodes were planned before their input token was known: the steps overlapped.
    assert any(e.token_ids == (PLACEHOLDER_TOKEN_ID,) for s in planned for e in s.requests)
    # Everything is freed once the engine has drained the step it still had in flight.
    core = async_llm.engine.core
    while core.has_unfinished():
        core.step()
    stats = core.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0


def test_async_scheduling_with_stop_strings_and_aborts(llama_dir: Path) -> None:
    llm = LLM(model=str(llama_dir), num_kv_blocks=64, max_num_seqs=32, async_scheduling=True)
    (full,) = llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    stop = full.outputs[0].text[5:9]
    (cut,) = llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]))
    assert cut.outputs[0].finish_reason == "stop"
    assert full.outputs[0].text.startswith(cut.outputs[0].text)
    engine = llm.engine
    engine.add_request("a", PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=50))
    for _ in range(4):
        engine.step()
    engine.abort_request(["a"])
    while engine.core.has_unfinished():
        engine.core.step()
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0
