"""Beam search through the whole stack (``llmserve up``, the official ``openai`` SDK; vLLM's
``use_beam_search`` extra): the ``n`` choices are the offline engine's ``n`` best beams, best
first, for completions (whole and streamed) and chat; what beam search does not take is 400
naming it, and a width past the limit is refused. The native client asks for the 2 best of 3."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from gpu_worker import LLM, BeamSearchParams
from llmserve.client import Client
from llmserve.prompt_input import ChatPrompt
from tests.router.frontends.stack_proc import MODEL, StackProc

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


@pytest.fixture(scope="module")
def client(stack: StackProc) -> OpenAI:
    return OpenAI(base_url=stack.openai_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(tiny_model: Callable[[str], Path]) -> Callable[[Any, int], list[str]]:
    """The offline engine's best beams' output texts for a prompt (text or chat messages)."""
    llm = LLM(model=str(tiny_model("llama")), num_kv_blocks=256)
    tokenizer = llm.get_tokenizer()

    def beams(prompt: Any, width: int) -> list[str]:
        if not isinstance(prompt, str):
            prompt = ChatPrompt(prompt)  # rendered and tokenized as the worker does a chat
        [out] = llm.beam_search([prompt], BeamSearchParams(beam_width=width, max_tokens=8, ignore_eos=True))
        return [tokenizer.decode(list(b.output_token_ids), skip_special_tokens=True) for b in out.sequences]

    return beams


def test_completion_choices_are_the_best_beams(client: OpenAI, stack: StackProc,
                                               offline: Callable[[Any, int], list[str]]) -> None:
    extra = {"use_beam_search": True, "ignore_eos": True}
    reply = client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=8, extra_body=extra)
    want = offline(PROMPT, 3)
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == want
    assert len(set(want)) == 3  # three different beams
    assert reply.usage is not None and reply.usage.completion_tokens == 24
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=8, stream=True,
                                       extra_body=extra)
    texts = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == want
    with Client(stack.grpc_target) as native:  # llmserve.v1: SamplingParams.beam_search, 2 of 3 beams
        done = native.complete(MODEL, prompt=PROMPT, n=2, max_tokens=8, ignore_eos=True,
                               beam_search={"beam_width": 3})
    assert [s.text for s in done.sequences] == want[:2]


def test_chat_choices_are_the_best_beams(client: OpenAI, offline: Callable[[Any, int], list[str]]) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    extra = {"use_beam_search": True, "ignore_eos": True}
    reply = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=8,  # type: ignore[arg-type]
                                           extra_body=extra)
    assert [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)] == offline(messages, 2)


def test_what_beam_search_does_not_take_is_refused(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="stop is not served with beam search"):
        client.completions.create(model=MODEL, prompt=PROMPT, n=2, max_tokens=4, stop=["x"],
                                  extra_body={"use_beam_search": True})
    with pytest.raises(openai.BadRequestError, match="must be at most 10") as err:
        client.completions.create(model=MODEL, prompt=PROMPT, n=11, max_tokens=4,
                                  extra_body={"use_beam_search": True})
    assert err.value.body["param"] == "n"  # type: ignore[index]
