"""vLLM's ``/tokenize``, ``/detokenize`` and ``/version`` on the router's OpenAI door of a real
``llmserve up`` stack: the ids are the model tokenizer's and those a generation is served with;
refusals name their parameter and limit."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.router.frontends.stack_proc import MODEL, StackProc, http_json

PROMPT = "The quick brown fox jumps over the lazy dog."
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model: Callable[[str], Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model("llama"))


def _post(stack: StackProc, route: str, body: dict[str, Any] | bytes) -> tuple[int, Any]:
    return http_json("POST", f"{stack.http_url}{route}", body)


def test_tokenize_a_prompt_as_the_model_tokenizer_does(stack: StackProc, hf_tokenizer: Any) -> None:
    status, reply = _post(stack, "/tokenize", {"model": MODEL, "prompt": PROMPT, "return_token_strs": True})
    ids = hf_tokenizer.encode(PROMPT)
    assert status == 200, reply
    assert reply == {"count": len(ids), "max_model_len": 512, "tokens": ids,
                     "token_strs": hf_tokenizer.convert_ids_to_tokens(ids)}
    # With one model served, "model" may be left out.
    status, plain = _post(stack, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    assert status == 200 and plain["tokens"] == hf_tokenizer.encode(PROMPT, add_special_tokens=False)
    assert plain["token_strs"] is None


def test_tokenize_a_chat_gives_the_ids_a_generation_is_served_with(stack: StackProc,
                                                                    hf_tokenizer: Any) -> None:
    status, reply = _post(stack, "/tokenize", {"model": MODEL, "messages": MESSAGES})
    text = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert status == 200, reply
    assert reply["tokens"] == hf_tokenizer.encode(text, add_special_tokens=False)
    client = OpenAI(base_url=stack.openai_url, api_key="unused", max_retries=0)
    served = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]
    assert served.usage is not None and served.usage.prompt_tokens == reply["count"]
    status, bare = _post(stack, "/tokenize",
                         {"model": MODEL, "messages": MESSAGES, "add_generation_prompt": False})
    text = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False)
    assert status == 200 and bare["tokens"] == hf_tokenizer.encode(text, add_special_tokens=False)
    assert bare["count"] < reply["count"]


def test_detokenize_round_trips(stack: StackProc, hf_tokenizer: Any) -> None:
    ids = hf_tokenizer.encode(PROMPT)
    status, reply = _post(stack, "/detokenize", {"model": MODEL, "tokens": ids})
    assert status == 200 and reply == {"prompt": hf_tokenizer.decode(ids)}
    assert reply["prompt"].endswith(PROMPT)
    assert _post(stack, "/detokenize", {"model": MODEL, "tokens": []}) == (200, {"prompt": ""})


@pytest.mark.parametrize(
    ("route", "body", "status", "param", "words"),
    [
        ("/tokenize", {"model": "no-such-model", "prompt": "x"}, 404, "model", "no-such-model"),
        ("/tokenize", {"model": MODEL, "prompt": "x", "messages": MESSAGES}, 400, "prompt", "exactly one"),
        ("/tokenize", {"model": MODEL}, 400, "prompt", "exactly one"),
        ("/tokenize", {"model": MODEL, "prompt": ""}, 400, "prompt", "empty"),
        ("/tokenize", {"model": MODEL, "messages": []}, 400, "messages", "messages"),
        ("/tokenize", {"model": MODEL, "messages": MESSAGES, "continue_final_message": True}, 400,
         "continue_final_message", "add_generation_prompt false"),
        ("/tokenize", {"model": MODEL, "prompt": "x" * 1_000_001}, 400, "prompt", "max_prompt_chars"),
        ("/tokenize", b"[1, 2]", 400, "body", "JSON object"),
        ("/detokenize", {"model": MODEL, "tokens": [1, 10**9]}, 400, "tokens", "vocabulary"),
        ("/detokenize", {"model": MODEL, "tokens": [-1]}, 400, "tokens", "vocabulary"),
        ("/detokenize", {"model": MODEL, "tokens": [1] * 513}, 400, "tokens", "max_model_len"),
        ("/detokenize", {"model": MODEL, "tokens": "1 2"}, 400, "tokens", "tokens"),
    ],
)
def test_refusals_name_the_parameter(stack: StackProc, route: str, body: dict[str, Any] | bytes, status: int,
                                     param: str | None, words: str) -> None:
    got, reply = _post(stack, route, body)
    assert got == status, reply
    error = reply["error"]
    assert error["param"] == param and words in error["message"], error


def test_version(stack: StackProc) -> None:
    version = importlib.metadata.version("llmserve")
    assert http_json("GET", f"{stack.http_url}/version") == (200, {"version": version})
