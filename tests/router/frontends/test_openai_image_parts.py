"""The chat door's image parts on their own (no server): data URLs decoded in order of appearance
across the conversation, a message with images given to the template as text and image parts, a
text chat unchanged, other URLs and part types refused naming the part; and the prompt check
every engine runs accepts those parts (llmserve/prompt_input.py)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from llmserve.prompt_input import ChatPrompt, check_prompt_input, template_messages
from router.frontends.openai_errors import InvalidParam
from router.frontends.openai_schemas import ChatCompletionRequest, CompletionRequest, validate
from router.generation import RouterRequest


def data_url(image: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(image).decode()


def image(url: str, detail: str | None = None) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}}


def routed(messages: list[dict[str, Any]], **body: Any) -> RouterRequest:
    [request] = validate(ChatCompletionRequest, {"model": "m", "messages": messages, **body}
                         ).to_router_requests("chatcmpl-1", 128)
    return request


def test_images_go_in_order_and_the_template_gets_their_parts() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, image(data_url(b"one"), "high"),
                                     {"type": "text", "text": "with"},
                                     {"type": "image_url", "image_url": data_url(b"two", "image/jpeg")}]},
        {"role": "assistant", "content": "The first."},
        {"role": "user", "content": [image(data_url(b"three")), {"type": "text", "text": "And this?"}]},
    ]
    request = routed(messages)
    assert request.images == (b"one", b"two", b"three")
    assert isinstance(request.prompt, ChatPrompt)
    assert request.prompt.messages == (
        {"role": "system", "content": "Be brief."},  # no images: the string as before
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                     {"type": "text", "text": "with"}, {"type": "image"}]},
        {"role": "assistant", "content": "The first."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
    )
    check_prompt_input(request.prompt)  # what every engine checks takes the parts
    assert template_messages(request.prompt)[1]["content"] == request.prompt.messages[1]["content"]


def test_a_text_chat_is_unchanged() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    request = routed([{"role": "user", "content": parts}, {"role": "assistant", "content": None,
                                                            "tool_calls": []}])
    assert request.images == ()
    assert isinstance(request.prompt, ChatPrompt)
    assert request.prompt.messages[0] == {"role": "user", "content": "a\nb"}


@pytest.mark.parametrize(("url", "needle"), [
    ("https://example.com/cat.png", "only data: URLs"),
    ("http://127.0.0.1:8000/metrics", "only data: URLs"),
    ("file:///etc/passwd", "only data: URLs"),
    ("cat.png", "only data: URLs"),
    ("data:image/png,rawbytes", "must be base64"),
    ("data:image/png;base64,***", "not valid base64"),
    ("data:image/png;base64,aGVsbG8", "not valid base64"),  # unpadded
])
def test_other_urls_and_bad_payloads_are_refused_naming_the_part(url: str, needle: str) -> None:
    messages = [{"role": "user", "content": "Hi"},
                {"role": "user", "content": [{"type": "text", "text": "Look"}, image(data_url(b"ok")),
                                             image(url)]}]
    with pytest.raises(InvalidParam, match=needle) as bad:
        routed(messages)
    assert bad.value.param == "messages[1].content[2].image_url"
    assert str(bad.value).startswith("messages[1].content[2].image_url: ")


@pytest.mark.parametrize("part", [
    {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
    {"type": "file", "file": {"file_id": "f"}},
    {"type": "image_url"},  # no URL
    {"text": "no type"},
])
def test_other_parts_are_refused_as_before(part: dict[str, Any]) -> None:
    with pytest.raises(InvalidParam) as bad:
        routed([{"role": "user", "content": [{"type": "text", "text": "Hi"}, part]}])
    assert bad.value.param == "messages[0].content"


def test_completions_take_no_images() -> None:
    body = {"model": "m", "prompt": "<image> Hi", "max_tokens": 2}
    [request] = validate(CompletionRequest, body).to_router_requests("cmpl-1", 128)
    assert request.images == ()


@pytest.mark.parametrize("content", [
    [],  # no parts
    [{"type": "text"}],  # no text
    [{"type": "text", "text": 3}],
    [{"type": "image_url", "image_url": {"url": "data:,"}}],  # a door's part, not a template's
    ["text"],
])
def test_the_prompt_check_refuses_other_part_lists(content: list[Any]) -> None:
    check_prompt_input(ChatPrompt(({"role": "user", "content": [{"type": "image"},
                                                                {"type": "text", "text": "Hi"}]},)))
    with pytest.raises(ValueError, match=r"^messages\[0\] must have a role and a content$"):
        check_prompt_input(ChatPrompt(({"role": "user", "content": content},)))
