"""Serving without a tokenizer (``skip_tokenizer_init``): token ids in, token ids out.

The tiny llama here is saved without tokenizer files; with ``seed=0`` it has the same weights
as the ``tiny_model("llama")`` fixture (saved with the SmolLM2 tokenizer), so both engines must
produce the same token ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from gpu_worker.config import EngineConfig
from gpu_worker.engine.async_llm import AsyncLLM
from gpu_worker.engine.core import skips_tokenizer
from gpu_worker.engine.output_processor import merge_deltas
from gpu_worker.llm import LLM
from gpu_worker.outputs import CompletionOutput, Logprob, RequestOutput
from gpu_worker.sampling_params import SamplingParams
from tests.helpers.tiny_models import EOS_TOKEN_ID, make_tiny_model

PROMPT = [1, 504, 3458, 282, 4649, 314, 17, 900]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
NO_TOKENIZER = "this model has no tokenizer: send prompt_token_ids"
ENGINE_ARGS = dict(num_kv_blocks=64, max_num_seqs=8)


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama of seed 0 with no tokenizer next to it."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("bare-llama"))


@pytest.fixture(scope="module")
def llm(bare_model: Path) -> LLM:
    return LLM(str(bare_model), skip_tokenizer_init=True, **ENGINE_ARGS)


def test_tokenizer_is_skipped_when_asked_or_dummy_without_files(
    bare_model: Path, tiny_model: Callable[[str], Path]
) -> None:
    assert skips_tokenizer(EngineConfig(model=str(bare_model), skip_tokenizer_init=True), bare_model)
    assert skips_tokenizer(EngineConfig(model=str(bare_model), load_format="dummy"), bare_model)
    assert not skips_tokenizer(EngineConfig(model=str(bare_model)), bare_model)
    with_tok = tiny_model("llama")
    assert not skips_tokenizer(EngineConfig(model=str(with_tok), load_format="dummy"), with_tok)
    with pytest.raises(ValueError, match="exclude each other"):
        EngineConfig(model=str(bare_model), skip_tokenizer_init=True, tokenizer=str(with_tok))


def test_token_ids_match_the_engine_with_a_tokenizer(llm: LLM, tiny_model: Callable[[str], Path]) -> None:
    (out,) = llm.generate(PROMPT, GREEDY)
    reference = LLM(str(tiny_model("llama")), **ENGINE_ARGS).generate(PROMPT, GREEDY)[0]
    assert llm.get_tokenizer() is None and out.prompt is None
    assert out.outputs[0].text == "" and len(out.outputs[0].token_ids) == 12
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids


def test_eos_comes_from_the_config(llm: LLM) -> None:
    assert llm.engine.core.eos_token_ids == frozenset({EOS_TOKEN_ID})
    params = SamplingParams(max_tokens=4, temperature=0.0, logit_bias={EOS_TOKEN_ID: 100.0})
    (out,) = llm.generate(PROMPT, params)
    assert out.outputs[0].token_ids == [EOS_TOKEN_ID] and out.outputs[0].finish_reason == "stop"


def test_logprobs_carry_no_decoded_text(llm: LLM) -> None:
    (out,) = llm.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0.0, logprobs=2))
    logprobs = out.outputs[0].logprobs
    assert logprobs is not None and len(logprobs) == 3
    assert all(lp.decoded_token is None for step in logprobs for lp in step.values())


@pytest.mark.parametrize("call", ["text", "chat", "stop"])
def test_text_inputs_and_stop_strings_are_refused(llm: LLM, call: str) -> None:
    with pytest.raises(ValueError) as err:
        if call == "text":
            llm.generate("hello world", GREEDY)
        elif call == "chat":
            llm.chat([{"role": "user", "content": "hi"}], GREEDY)
        else:
            llm.generate(PROMPT, SamplingParams(max_tokens=4, stop=["\n"]))
    expected = "this model has no tokenizer" if call == "stop" else NO_TOKENIZER
    assert expected in str(err.value)
    assert not llm.engine.has_unfinished_requests()


def test_merge_deltas_concatenates_per_sample() -> None:
    lp = {5: Logprob(-0.1, 1)}
    a = RequestOutput("r", None, [1], [CompletionOutput(0, "a", [5], -0.1, [lp]),
                                       CompletionOutput(1, "x", [6], None, None)], False)
    b = RequestOutput("r", None, [1], [CompletionOutput(0, "b", [7], -0.3, [lp], "length")], True, 4)
    merged = merge_deltas(a, b)
    assert merged.finished and merged.num_cached_tokens == 4
    first, second = merged.outputs
    got = (first.text, first.token_ids, first.cumulative_logprob, first.finish_reason)
    assert got == ("ab", [5, 7], -0.3, "length")
    assert first.logprobs == [lp, lp] and second.token_ids == [6]


async def test_a_slow_stream_gets_merged_deltas(bare_model: Path, llm: LLM) -> None:
    """A consumer slower than the engine reads fewer, larger deltas; the tokens are the same."""
    engine = AsyncLLM.from_config(EngineConfig(model=str(bare_model), load_format="dummy", **ENGINE_ARGS))
    try:
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        outputs = []
        async for out in engine.generate(PROMPT, params, "slow"):
            outputs.append(out)
            await asyncio.sleep(0.05)
    finally:
        await engine.shutdown()
    ids = [t for o in outputs for t in o.outputs[0].token_ids]
    assert len(ids) == 24 and len(outputs) < 24 and outputs[-1].finished
    assert all(o.outputs[0].text == "" for o in outputs)
