"""Tool calls read from a chat choice's text (router/frontends/tool_calls.py): each tool choice's
format, whole and streamed in every split, and the malformed texts that stay content."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.frontends.tool_calls import (
    ToolCallStream,
    ToolChoice,
    function_tools,
    parse_hermes,
    parse_required,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = function_tools([WEATHER, TIME])
HERMES = ToolChoice("auto", TOOLS, parser="hermes")


def streamed(choice: ToolChoice, pieces: list[str]) -> tuple[str, list[dict[str, Any]], ToolCallStream]:
    """Feed ``pieces``; the content streamed and the tool-call deltas, merged by index."""
    stream = ToolCallStream(choice)
    content, calls = "", {}
    for delta in [*(stream.feed(p) for p in pieces), stream.finish()]:
        content += delta.get("content") or ""
        for call in delta.get("tool_calls", []):
            into = calls.setdefault(call["index"], {"function": {"arguments": ""}})
            for key in ("id", "type"):
                if key in call:
                    into[key] = call[key]
            into["function"]["name"] = call["function"].get("name", into["function"].get("name"))
            into["function"]["arguments"] += call["function"].get("arguments", "")
    return content, [calls[i] for i in sorted(calls)], stream


def splits(text: str) -> list[list[str]]:
    """``text`` whole, one character at a time, and cut at every position into two."""
    return [[text], list(text), *([text[:i], text[i:]] for i in range(1, len(text)))]


def test_hermes_calls_with_content_before_them() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = parse_hermes(text)
    assert content == "Let me check."
    expected = [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
    for pieces in splits(text):
        streamed_content, deltas, stream = streamed(HERMES, pieces)
        assert streamed_content.strip() == "Let me check." and stream.called
        assert [(d["function"]["name"], json.loads(d["function"]["arguments"])) for d in deltas] == expected
        assert all(d["id"].startswith("chatcmpl-tool-") and d["type"] == "function" for d in deltas)
        message = stream.message()
        assert message["content"] == "Let me check." and len(message["tool_calls"]) == 2


@pytest.mark.parametrize("text", [
    "No tools needed: <tool is a word here.",
    '<tool_call>{"name": "get_weather", "arguments": "Paris"}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call> and then some text',
    "<tool_call>not json</tool_call>",
])
def test_text_that_is_no_call_stays_content(text: str) -> None:
    assert parse_hermes(text) == (text, [])
    for pieces in (splits(text) if len(text) < 80 else [[text]]):
        content, deltas, stream = streamed(HERMES, pieces)
        assert content == text and not deltas and not stream.called
        assert stream.message() == {"role": "assistant", "content": text}


def test_a_call_cut_by_max_tokens_is_read_to_the_end() -> None:
    content, calls = parse_hermes('<tool_call>{"name": "get_time", "arguments": {}}')
    assert content is None and [c.name for c in calls] == ["get_time"]


def test_named_streams_the_arguments_as_they_come() -> None:
    named = ToolChoice("named", TOOLS, name="get_weather")
    pieces = ['{"ci', 'ty": "Ro', 'me"}']
    stream = ToolCallStream(named)
    first, *rest = [stream.feed(p) for p in pieces]
    assert first["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"ci'}
    expected = [{"index": 0, "function": {"arguments": p}} for p in pieces[1:]]
    assert [d["tool_calls"][0] for d in rest] == expected
    assert stream.finish() == {}
    message = stream.message()
    assert message["content"] is None
    assert message["tool_calls"][0]["id"] == first["tool_calls"][0]["id"]
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}


def test_required_calls_and_their_schema() -> None:
    required = ToolChoice("required", TOOLS, parallel=False)
    schema = required.structured_output()
    assert schema is not None
    items = schema["json"]["items"]["anyOf"]
    assert [i["properties"]["name"] for i in items] == [{"enum": ["get_weather"]}, {"enum": ["get_time"]}]
    assert schema["json"]["maxItems"] == 1 and schema["json"]["minItems"] == 1
    text = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    calls = parse_required(text)
    assert calls is not None
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Oslo"}')]
    content, deltas, stream = streamed(required, list(text))
    assert content == "" and [d["function"]["name"] for d in deltas] == ["get_weather"]
    cut = '[{"name": "get_weather", "param'  # max_tokens ended it: the text, as content
    assert parse_required(cut) is None
    content, deltas, stream = streamed(required, [cut])
    assert content == cut and not deltas and stream.message() == {"role": "assistant", "content": cut}


def test_named_schema_is_the_functions_parameters() -> None:
    assert ToolChoice("named", TOOLS, name="get_time").structured_output() == {
        "json": {"type": "object", "properties": {}}}
    assert ToolChoice("auto", TOOLS, parser="hermes").structured_output() is None


@pytest.mark.parametrize("tools,message", [
    ([{"type": "code_interpreter"}], "tools\\[0\\] must be"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools\\[0\\].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "parameters must be a JSON schema"),
    ([TIME, TIME], "distinct function names"),
])
def test_bad_tools_are_refused(tools: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        function_tools(tools)


WEATHER_AND_TIME = [("get_weather", {"city": "Paris"}), ("get_time", {})]


@pytest.mark.parametrize("parser,text,content", [
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", '
                    '"parameters": {}}', None),
    ("llama3_json", ' {"name": "get_weather", "arguments": {"city": "Paris"}};{"name": "get_time", '
                    '"arguments": {}}', None),
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "get_time", "arguments": {}}]', "Sure."),
    ("mistral", '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
                '"arguments": {}}]', None),  # the marker is a special token: usually not in the text
])
def test_llama3_and_mistral_calls(parser: str, text: str, content: str | None) -> None:
    choice = ToolChoice("auto", TOOLS, parser=parser)
    for pieces in splits(text):
        streamed_content, deltas, stream = streamed(choice, pieces)
        assert streamed_content.strip() == (content or "")
        assert [(d["function"]["name"], json.loads(d["function"]["arguments"])) for d in deltas] == \
            WEATHER_AND_TIME
        assert stream.message()["content"] == content


@pytest.mark.parametrize("parser,text", [
    ("llama3_json", "The weather is {unknown}."),
    ("llama3_json", '{"city": "Paris"}'),  # JSON, but no call
    ("llama3_json", '{"name": "get_time", "parameters": {}} and more'),
    ("mistral", "[1, 2, 3]"),
    ("mistral", "Lists look like [this]."),
])
def test_llama3_and_mistral_texts_that_are_no_call(parser: str, text: str) -> None:
    choice = ToolChoice("auto", TOOLS, parser=parser)
    for pieces in splits(text):
        content, deltas, stream = streamed(choice, pieces)
        assert content == text and not deltas and not stream.called
