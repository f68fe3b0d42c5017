"""vLLM's ``allowed_token_ids`` and ``bad_words``: greedy tokens equal HF transformers' argmax with
the same masks (float32, CPU), and the same tokens through async scheduling and speculative
decoding; the worker's tokenization of the words."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_worker import LLM, SamplingParams
from gpu_worker.engine.processor import InputProcessor

MAX_TOKENS = 8
PROMPTS = [[(13 * i + 5 * j) % 3000 + 7 for j in range(11 + 4 * i)] for i in range(3)]


def hf_masked_greedy(model: Any, prompt: list[int], allowed: Sequence[int] | None,
                     bad: Sequence[tuple[int, ...]], max_tokens: int) -> list[int]:
    """HF's greedy continuation where each step keeps only ``allowed`` and masks a bad sequence's
    last token when the output so far ends with the rest of it (vLLM's rule)."""
    out: list[int] = []
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float()
        if allowed is not None:
            keep = torch.full_like(logits, float("-inf"))
            keep[list(allowed)] = 0.0
            logits = logits + keep
        for ids in bad:
            prefix = ids[:-1]
            if not prefix or (len(out) >= len(prefix) and tuple(out[len(out) - len(prefix):]) == prefix):
                logits[ids[-1]] = float("-inf")
        out.append(int(logits.argmax()))
    return out


@pytest.fixture(scope="module")
def model_and_hf(tiny_model: Callable[[str], Path], hf_model: Callable[[Path], Any]) -> tuple[Path, Any]:
    path = tiny_model("llama")
    return path, hf_model(path)


def test_masks_match_hf_on_every_path(model_and_hf: tuple[Path, Any]) -> None:
    path, ref = model_and_hf
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(model=str(path), skip_tokenizer_init=True, num_kv_blocks=64, async_scheduling=False) as llm:
        plain = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)]
    # Per prompt: an allowed set without its plain first token; a one-token bad word (its plain
    # first token); a two-token bad word (its plain 2nd and 3rd tokens: masked at the third).
    cases = []
    for prompt, tokens in zip(PROMPTS, plain, strict=True):
        allowed = sorted({*range(100, 400), *tokens[1:4]} - {tokens[0]})
        cases += [(prompt, allowed, ()), (prompt, None, ((tokens[0],),)),
                  (prompt, None, ((tokens[1], tokens[2]),))]
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                             allowed_token_ids=allowed, bad_words_token_ids=bad) for _, allowed, bad in cases]
    expected = [hf_masked_greedy(ref, prompt, allowed, bad, MAX_TOKENS) for prompt, allowed, bad in cases]
    # Each case changes the plain continuation: the masks are in force.
    assert all(e != p for e, p in zip(expected, [t for t in plain for _ in range(3)], strict=True))
    prompts = [prompt for prompt, _, _ in cases]
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    for engine in (dict(async_scheduling=False), dict(async_scheduling=True),
                   dict(async_scheduling=False, speculative_config=ngram)):
        with LLM(model=str(path), skip_tokenizer_init=True, num_kv_blocks=64, **engine) as llm:
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert got == expected, engine


def test_sampled_tokens_stay_in_the_allowed_set(model_and_hf: tuple[Path, Any]) -> None:
    path, _ = model_and_hf
    allowed = [11, 12, 13, 500, 2001]
    with LLM(model=str(path), skip_tokenizer_init=True, num_kv_blocks=64) as llm:
        sampled = SamplingParams(temperature=1.5, seed=1, max_tokens=24, ignore_eos=True,
                                 allowed_token_ids=allowed)
        (out,) = llm.generate(PROMPTS[:1], sampled)
    assert set(out.outputs[0].token_ids) <= set(allowed) and len(set(out.outputs[0].token_ids)) > 1


def test_bad_words_are_tokenized_alone_and_after_a_space(smollm2_tokenizer: Any) -> None:
    processor = InputProcessor(smollm2_tokenizer, 49152, max_model_len=64, eos_token_ids=frozenset({2}))
    processed = processor.process("r", "Hello", SamplingParams(bad_words=["Paris", " Paris"]))
    alone = tuple(smollm2_tokenizer.encode("Paris", add_special_tokens=False))
    spaced = tuple(smollm2_tokenizer.encode(" Paris", add_special_tokens=False))
    assert alone != spaced  # SmolLM2 has a word token with its leading space
    (child,) = processed.core_requests
    assert child.params.bad_words_token_ids == (alone, spaced)  # " Paris" is the same word: once
    no_tokenizer = InputProcessor(None, 49152, max_model_len=64, eos_token_ids=frozenset({2}))
    with pytest.raises(ValueError, match="^bad_words: this model has no tokenizer"):
        no_tokenizer.process("r", [5, 6], SamplingParams(bad_words=["x"]))


@pytest.mark.parametrize("params,message", [
    (dict(allowed_token_ids=[]), "allowed_token_ids must not be empty"),
    (dict(allowed_token_ids=[49152]), "allowed_token_ids has token ids outside the vocabulary"),
    (dict(bad_words=[" "]), "bad_words must be non-blank strings"),
    (dict(bad_words=[f"w{i}" for i in range(129)]), "bad_words may hold at most 128 words"),
    (dict(bad_words=["x" * 8193]), "bad_words may hold at most 8192 characters together"),
    (dict(allowed_token_ids=[1] * (2**20 + 1)), "allowed_token_ids may hold at most 1048576 ids"),
    (dict(bad_words_token_ids=[tuple(range(65))]), "bad_words: a word must be 1 to 64 tokens long"),
])
def test_invalid_masks_name_the_field(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**params).validate(49152)
