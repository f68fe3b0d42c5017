"""Images through the whole stack: ``llmserve up`` serving a tiny LLaVA (router and worker in one
process), the official ``openai`` SDK sending image parts as data URLs and the native client
sending encoded files. The router renders the template, expands each image token as the worker
does and forwards the files; the greedy text equals the offline engine's for the same
conversation; refusals are 400s naming the part, the count or the flag, and the stack keeps
serving after each."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from gpu_worker import LLM, SamplingParams
from llmserve.client import Client, LLMServeError
from tests.gpu_worker.multimodal.test_llava_engine import picture, png
from tests.router.frontends.stack_proc import MODEL, StackProc, http_json, running_stack

ASK = "What do you see?"


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def chat(*images: bytes, text: str = ASK) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def llava_stack(tiny_model: Callable[[str], Path], otlp_receiver: Any,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProc]:
    with running_stack(tiny_model("llava"), tmp_path_factory.mktemp("llava-stack") / "llmserve-up.log",
                       otlp_receiver.endpoint) as proc:
        yield proc


@pytest.fixture(scope="module")
def offline(tiny_model: Callable[[str], Path]) -> Iterator[Callable[..., str]]:
    """The offline engine's greedy text for a conversation (or a prompt dict)."""
    llm = LLM(model=str(tiny_model("llava")), num_kv_blocks=64)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def run(messages: Any = None, prompt: Any = None) -> str:
        outputs = llm.chat(messages, params) if messages is not None else llm.generate([prompt], params)
        return outputs[0].outputs[0].text

    yield run
    llm.shutdown()


def _image_url(url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


ARGS: dict[str, Any] = {"max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}


def test_image_chats_equal_the_offline_engine(llava_stack: StackProc, offline: Callable[..., str]) -> None:
    client = OpenAI(base_url=llava_stack.openai_url, api_key="unused", max_retries=0)
    one, two = png(picture(11)), png(picture(12))
    for messages in (chat(one), chat(one, two, text="Which is brighter?"), chat(two)):
        want = offline(messages)
        got = client.chat.completions.create(model=MODEL, messages=messages, **ARGS)  # type: ignore[arg-type]
        assert got.choices[0].message.content == want
        streamed = client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, **ARGS)  # type: ignore[arg-type]
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want
    assert offline(chat(one)) != offline(chat(two))  # the picture matters
    # the prompt's tokens count each image's run (16 tokens), as the worker runs it
    usage = client.chat.completions.create(model=MODEL, messages=chat(one), **ARGS).usage  # type: ignore[arg-type]
    text_only = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": ASK}], **ARGS).usage
    assert usage is not None and text_only is not None
    assert usage.prompt_tokens - text_only.prompt_tokens == 16
    # vLLM's /tokenize counts the same tokens
    status, reply = http_json("POST", f"{llava_stack.http_url}/tokenize",
                              {"model": MODEL, "messages": chat(one)})
    assert status == 200 and reply["count"] == usage.prompt_tokens


def test_responses_take_input_images(llava_stack: StackProc, offline: Callable[..., str]) -> None:
    client = OpenAI(base_url=llava_stack.openai_url, api_key="unused", max_retries=0)
    image = png(picture(14))
    response = client.responses.create(
        model=MODEL, input=[{"role": "user", "content": [  # type: ignore[list-item]
            {"type": "input_image", "image_url": data_url(image), "detail": "auto"},
            {"type": "input_text", "text": ASK}]}],
        max_output_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert response.output_text == offline(chat(image))
    chained = client.responses.create(model=MODEL, input="And now?", previous_response_id=response.id,
                                      max_output_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    history = [*chat(image), {"role": "assistant", "content": response.output_text},
               {"role": "user", "content": "And now?"}]
    assert chained.output_text == offline(history)  # the stored turn kept its image


def test_native_client_sends_files(llava_stack: StackProc, offline: Callable[..., str]) -> None:
    prompt = "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    image = png(picture(13))
    want = offline(prompt={"prompt": prompt, "multi_modal_data": {"image": image}})
    with Client(llava_stack.grpc_target) as native:
        got = native.complete(MODEL, prompt=prompt, images=[image], max_tokens=8, temperature=0.0,
                              ignore_eos=True)
        assert got.text == want
        with pytest.raises(LLMServeError, match="1 image tokens .* for 2 image"):
            native.complete(MODEL, prompt=prompt, images=[image, image], max_tokens=2)
        with pytest.raises(LLMServeError, match="max_images_per_request"):
            native.complete(MODEL, prompt=prompt * 9, images=[image] * 9, max_tokens=2)


@pytest.mark.parametrize("messages,needle", [
    (_image_url("https://example.com/a.png"), "only data: URLs"),
    (_image_url("file:///etc/passwd"), "only data: URLs"),
    (_image_url("data:image/png;base64,@@@"), "not valid base64"),
    (_image_url("data:image/png;base64,aGVsbG8="), "not an image this server can read"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}],
     "messages"),
    ([{"role": "user", "content": "<image> without a picture"}], "1 image tokens"),
])
def test_refusals_are_400s_and_the_stack_keeps_serving(llava_stack: StackProc, messages: list[Any],
                                                        needle: str) -> None:
    client = OpenAI(base_url=llava_stack.openai_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match=needle):
        client.chat.completions.create(model=MODEL, messages=messages, **ARGS)  # type: ignore[arg-type]
    ok = client.chat.completions.create(
        model=MODEL, messages=chat(png(picture(1))), **ARGS)  # type: ignore[arg-type]
    assert ok.choices[0].finish_reason == "length"


def test_too_many_images_name_the_flag(llava_stack: StackProc) -> None:
    client = OpenAI(base_url=llava_stack.openai_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max-images-per-request"):
        client.chat.completions.create(
            model=MODEL, messages=chat(*[png(picture(2))] * 9), **ARGS)  # type: ignore[arg-type]
