"""The example plug-in package (tests/plugins/llmserve_example_plugins, installed by `make`) is found
through its entry points and changes the output as documented; unknown names are refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gpu_worker import LLM, EngineConfig, SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.output_processor import OutputKind
from gpu_worker.plugins import (
    LogitsProcessor,
    SchedulingPolicy,
    StoppingCriterion,
    logits_processor_registry,
    scheduling_policy_registry,
    stopping_criterion_registry,
)

PROMPTS = ["The capital of France is", "Once upon a time"]


@pytest.fixture(scope="module")
def llama_dir(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(model=str(llama_dir), num_kv_blocks=128, max_num_seqs=8)


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, **kw)  # type: ignore[arg-type]


def test_the_example_package_is_discovered_by_entry_point() -> None:
    for registry, name, base in [
        (logits_processor_registry(), "example_ban_tokens", LogitsProcessor),
        (stopping_criterion_registry(), "example_max_chars", StoppingCriterion),
        (scheduling_policy_registry(), "example_shortest_prompt_first", SchedulingPolicy),
    ]:
        assert name in registry.names()
        cls = registry.get(name)
        assert issubclass(cls, base) and cls.__module__ == "llmserve_example_plugins"
    assert {"fcfs", "priority"} <= set(scheduling_policy_registry().names())


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_ban_tokens_forbids_its_tokens_and_leaves_other_rows_alone(
    llama_dir: Path, async_scheduling: bool
) -> None:
    llm = LLM(model=str(llama_dir), num_kv_blocks=128, max_num_seqs=8, async_scheduling=async_scheduling)
    free = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy())]
    banned = sorted(set(free[0]))
    ban = {"name": "example_ban_tokens", "args": {"token_ids": banned}}
    outs = llm.generate(PROMPTS, [greedy(logits_processors=[ban]), greedy()])
    assert not set(outs[0].outputs[0].token_ids) & set(banned)
    assert outs[1].outputs[0].token_ids == free[1]  # the neighbour without the processor is unchanged


def test_max_chars_ends_the_sequence_at_the_first_token_reaching_the_length(llm: LLM) -> None:
    criterion = {"name": "example_max_chars", "args": {"chars": 15}}
    (out,) = llm.generate(PROMPTS[:1], SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=64,
                                                      stopping_criteria=[criterion]))
    tokenizer = llm.get_tokenizer()
    for c in out.outputs:
        assert (c.finish_reason, c.stop_reason) == ("stop", "example_max_chars")
        assert len(c.text) >= 15
        assert len(tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)) < 15


def test_shortest_prompt_first_policy_admits_short_prompts_first(llama_dir: Path) -> None:
    engine = LLMEngine.from_config(EngineConfig(model=str(llama_dir), num_kv_blocks=64, max_num_seqs=1,
                                                scheduling_policy="example_shortest_prompt_first"))
    prompts = {"long": "one two three four five six seven eight nine", "short": "one", "mid": "one two three"}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, SamplingParams(max_tokens=2), kind=OutputKind.FINAL_ONLY)
    finished = []
    while engine.has_unfinished_requests():
        finished.extend(o.request_id for o in engine.step() if o.finished)
    assert finished == ["short", "mid", "long"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"logits_processors": ["no_such_processor"]},
         "logits_processors: 'no_such_processor' is not an installed"),
        ({"stopping_criteria": [{"name": "nope", "args": 1}]},
         "stopping_criteria: 'nope' is not an installed"),
        ({"logits_processors": [{"name": "example_ban_tokens", "args": {"token_ids": "all"}}]},
         "example_ban_tokens needs args"),
        ({"stopping_criteria": [{"name": "example_max_chars"}]}, "example_max_chars needs args"),
    ],
)
def test_unknown_names_and_bad_args_are_refused(llm: LLM, params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate(PROMPTS[:1], SamplingParams(**params))  # type: ignore[arg-type]


def test_an_unknown_scheduling_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="scheduling_policy must be one of .*example_shortest_prompt_first"):
        EngineConfig(scheduling_policy="lottery")


def test_plugin_args_must_be_json_data() -> None:
    with pytest.raises(ValueError, match="args must be JSON data"):
        SamplingParams(logits_processors=[{"name": "example_ban_tokens", "args": {1, 2}}])
