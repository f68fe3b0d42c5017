"""N-gram speculation on SmolLM2-135M (the real model copies its prompt): greedy output equals
plain decoding with most drafts accepted; sampled output with a seed is reproducible."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpu_worker import LLM, SamplingParams

CODE = '''def area(width, height):
    """Area of a rectangle."""
    if width < 0 or height < 0:
        raise ValueError("negative size")
    return width * height
'''
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[LLM, LLM]]:
    with LLM(model="smollm2-135m", max_num_seqs=4) as plain, LLM(
        model="smollm2-135m", max_num_seqs=4, speculative_config=SPEC
    ) as spec:
        yield plain, spec


def copy_prompt(llm: LLM) -> str:
    text = "Rewrite this function with `width` renamed to `w`. Output only the code.\n\n" + CODE
    prompt: str = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return prompt


def test_greedy_copy_is_identical_and_mostly_accepted(engines: tuple[LLM, LLM]) -> None:
    plain, spec = engines
    prompt = copy_prompt(plain)
    params = SamplingParams(temperature=0.0, max_tokens=48)
    (want,) = plain.generate([prompt], params)
    (got,) = spec.generate([prompt], params)
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert 'raise ValueError("negative size")' in got.outputs[0].text  # it copies its prompt
    counts = spec.engine.stats().spec_decode
    assert counts is not None and counts.acceptance_rate > 0.5, counts
    assert counts.num_drafts < len(got.outputs[0].token_ids) / 2  # well over two tokens per step


def test_seeded_sampling_is_reproducible_with_drafts(engines: tuple[LLM, LLM]) -> None:
    _, spec = engines
    prompt = copy_prompt(spec)
    params = SamplingParams(temperature=0.5, max_tokens=32, seed=3)
    before = spec.engine.stats().spec_decode
    first = spec.generate([prompt], params)[0].outputs[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=16)
    again = spec.generate([prompt, "Tell me a story."], [params, other])
    assert again[0].outputs[0].token_ids == first
    after = spec.engine.stats().spec_decode
    assert before is not None and after is not None
    assert after.num_accepted_tokens > before.num_accepted_tokens  # sampled runs accept drafts too
