"""Structured output through the engine on the tiny random llama (SmolLM2 tokenizer): whatever the
weights, every output follows its format; it interoperates with n > 1, stop strings, preemption,
async scheduling and prefix caching; grammars compile once; a bad format names its problem."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from gpu_worker import LLM, SamplingParams
from gpu_worker.sampling_params import StructuredOutputsParams

REGEX = r"[a-z]{3,6}-[0-9]{2}"
CHOICES = ["alpha", "beta", "gamma delta"]
PROMPTS = ["Name a thing:", "Once upon a time, in a land far away, there lived", "1, 2, 3,"]


@pytest.fixture(scope="module")
def llama_dir(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(model=str(llama_dir), num_kv_blocks=256, max_num_seqs=32)


def regex_params(**kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=40, structured_output={"regex": REGEX}, **kw)  # type: ignore[arg-type]


def assert_follows(text: str, finish_reason: str | None) -> None:
    assert re.fullmatch(REGEX, text), text
    assert finish_reason == "stop"


def test_n_samples_each_follow_the_format(llm: LLM) -> None:
    (out,) = llm.generate(PROMPTS[:1], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=20,
                                                      structured_output={"choice": CHOICES}))
    assert len(out.outputs) == 4
    assert all(c.text in CHOICES and c.finish_reason == "stop" for c in out.outputs)
    assert len({c.text for c in out.outputs}) > 1  # the samples differ, each within the format


def test_stop_string_cuts_a_constrained_output(llm: LLM) -> None:
    (free,) = llm.generate(PROMPTS[:1], regex_params(temperature=0.0))
    assert_follows(free.outputs[0].text, free.outputs[0].finish_reason)
    (cut,) = llm.generate(PROMPTS[:1], regex_params(temperature=0.0, stop=["-"]))
    assert cut.outputs[0].text == free.outputs[0].text.split("-")[0]
    assert (cut.outputs[0].finish_reason, cut.outputs[0].stop_reason) == ("stop", "-")
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=1))  # the next step drops finished matchers
    assert llm.engine.core.structured.num_sequences == 0  # the aborted one's too


def test_preemption_async_scheduling_and_prefix_hits_keep_outputs(llama_dir: Path, llm: LLM) -> None:
    prompts = [p + f" {i}" for i in range(4) for p in PROMPTS]
    params = [regex_params(temperature=0.0), regex_params(temperature=1.0, seed=5),
              SamplingParams(max_tokens=60, temperature=0.0, structured_output={"json": {
                  "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                                   "ok": {"type": "boolean"}}, "required": ["id", "ok"]}})]
    params = [params[i % 3] for i in range(len(prompts))]
    reference = [o.outputs[0] for o in llm.generate(prompts, params)]
    for c, p in zip(reference, params, strict=True):
        assert c.finish_reason == "stop"
        if p.structured_output is not None and p.structured_output.kind == "regex":
            assert re.fullmatch(REGEX, c.text)
    # A pool of 6 blocks for 12 requests: they preempt each other; the engine plans ahead too.
    small = LLM(model=str(llama_dir), num_kv_blocks=6, max_num_seqs=12, async_scheduling=True)
    again = [o.outputs[0] for o in small.generate(prompts, params)]
    assert small.engine.stats().num_preemptions > 0
    assert [c.token_ids for c in again] == [c.token_ids for c in reference]
    cached = llm.generate(prompts, params)  # every prompt is in the prefix cache now
    assert all(o.num_cached_tokens > 0 for o in cached if len(o.prompt_token_ids) > 16)
    assert [o.outputs[0].token_ids for o in cached] == [c.token_ids for c in reference]


def test_grammars_compile_once_per_format_in_a_bounded_cache(llm: LLM) -> None:
    cache = llm.engine.core.structured.cache
    misses = cache.misses
    formats = [{"regex": "[0-9]{2}"}, {"regex": "[0-9]{3}"}, {"choice": ["x", "y"]}]
    llm.generate(PROMPTS * 3, [SamplingParams(max_tokens=8, structured_output=f) for f in formats * 3])
    assert cache.misses - misses == 3
    assert len(cache) <= cache.capacity


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"json": '{"type": "object", "properties": {"a": {"type": "fancy"}}}'},
         'structured_output.json.*"fancy"'),
        ({"json": "{not json"}, "structured_output.json is not valid JSON"),
        ({"regex": "[a-"}, "structured_output.regex does not compile.*Unclosed"),
        ({"grammar": "root ::= missing"},
         'structured_output.grammar does not compile.*"missing" is not defined'),
        ({"choice": []}, "structured_output.choice must hold"),
        ({"regex": "a", "choice": ["b"]}, "exactly one of"),
        ({"jsonschema": "{}"}, "unknown keys"),
    ],
)
def test_a_format_that_does_not_compile_is_refused_naming_the_problem(
    llm: LLM, spec: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate(PROMPTS[:1], SamplingParams(structured_output=spec))


def test_structured_output_excludes_ignore_eos_and_min_tokens() -> None:
    with pytest.raises(ValueError, match="ignore_eos cannot be combined"):
        SamplingParams(ignore_eos=True, structured_output={"regex": "a"})
    with pytest.raises(ValueError, match="min_tokens cannot be combined"):
        SamplingParams(min_tokens=2, structured_output={"regex": "a"})


def test_a_schema_too_deep_for_the_json_parser_is_a_value_error() -> None:
    """The parser's own recursion bound (a network request meets ``max_format_depth`` first)."""
    for deep in ("[" * 100_000 + "]" * 100_000, {"a": _nested_dict(5000)}):
        with pytest.raises(ValueError, match="structured_output.json is nested too deeply"):
            StructuredOutputsParams(json=deep)  # type: ignore[arg-type]


def _nested_dict(depth: int) -> dict[str, object]:
    node: dict[str, object] = {}
    for _ in range(depth):
        node = {"k": node}
    return node


def test_vllm_style_params_object_is_accepted(llm: LLM) -> None:
    spec = StructuredOutputsParams(json_object=True)
    (out,) = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=40, temperature=0.0, structured_output=spec))
    assert out.outputs[0].text.startswith("{")
