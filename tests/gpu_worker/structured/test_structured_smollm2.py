"""Structured output on SmolLM2: 20 JSON schemas at temperature 0 and 0.8, regexes and choices in
one batch with unconstrained requests; every output parses and validates, the grammar ends it
("stop"), and the unconstrained neighbours get the same tokens as without them."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from gpu_worker import LLM, SamplingParams
from tests.gpu_worker.structured.schemas import SCHEMAS

MAX_TOKENS = 80
REGEXES = [r"(yes|no), [0-9]{1,3} (apples|pears)", r"[A-Z][a-z]{2,7} [0-9]{3}"]
CHOICES = [["Paris", "London", "Berlin"], ["positive", "negative", "neutral"]]
TEMPERATURES = (0.0, 0.8)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="smollm2-135m", max_num_seqs=64)


def chat(llm: LLM, text: str) -> str:
    prompt: str = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return prompt


def params(temperature: float, seed: int, max_tokens: int = MAX_TOKENS, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens, **kw)


def test_every_output_follows_its_format_and_neighbours_are_unchanged(llm: LLM) -> None:
    requests: list[tuple[str, SamplingParams, str, Any]] = []  # (prompt, params, kind, expected)
    for t in TEMPERATURES:
        for i, (what, schema) in enumerate(SCHEMAS):
            json_params = params(t, i, structured_output={"json": schema})
            requests.append((chat(llm, f"Reply in JSON: {what}."), json_params, "json", schema))
        for i, regex in enumerate(REGEXES):
            requests.append((chat(llm, "Answer briefly."), params(t, i, structured_output={"regex": regex}),
                             "regex", regex))
        for i, choices in enumerate(CHOICES):
            requests.append((chat(llm, f"Pick one of {', '.join(choices)}."),
                             params(t, i, structured_output={"choice": choices}), "choice", choices))
    free = [(chat(llm, "Tell me about cats."), params(0.0, 0, max_tokens=24)),
            (chat(llm, "Write a JSON object about dogs."), params(0.8, 7, max_tokens=24))]
    prompts = [p for p, *_ in requests] + [p for p, _ in free]
    outputs = llm.generate(prompts, [sp for _, sp, *_ in requests] + [sp for _, sp in free])
    failures = []
    for (_, sp, kind, expected), out in zip(requests, outputs, strict=False):
        completion = out.outputs[0]
        text = completion.text
        try:
            assert completion.finish_reason == "stop", f"ended by {completion.finish_reason}"
            if kind == "json":
                jsonschema.validate(json.loads(text), expected)
            elif kind == "regex":
                assert re.fullmatch(expected, text), "does not match"
            else:
                assert text in expected, "not a choice"
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append((kind, sp.temperature, text, str(exc)[:200]))
    assert not failures, failures
    alone = llm.generate([p for p, _ in free], [sp for _, sp in free])
    together = outputs[len(requests):]
    assert [o.outputs[0].token_ids for o in alone] == [o.outputs[0].token_ids for o in together]
    core = llm.engine.core
    assert core.structured.cache.misses == len(SCHEMAS) + len(REGEXES) + len(CHOICES)  # one compile each
    assert core.structured.num_sequences == 0  # every matcher dropped (by the steps of `alone`)
