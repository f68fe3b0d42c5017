"""Reasoning split from a thinking model's reply (router/frontends/reasoning.py), whole and in
every streamed split (no delta ever holds part of a tag), and through the chat renderer with
tool calls after the reasoning."""

from __future__ import annotations

import json

import pytest

from llmserve.v1 import generation_pb2 as gen_pb
from router.frontends.openai_responses import ChatRenderer
from router.frontends.reasoning import ReasoningStream
from router.frontends.tool_calls import ToolChoice, function_tools


def split(parser: str, pieces: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
    """The reasoning and answer of ``pieces`` fed in turn, and each step's delta."""
    stream = ReasoningStream(parser)
    deltas = [stream.feed(p) for p in pieces] + [stream.finish()]
    pairs = [(d.reasoning, d.content) for d in deltas]
    assert "".join(r for r, _ in pairs) == stream.reasoning and "".join(c for _, c in pairs) == stream.content
    return stream.reasoning, stream.content, pairs


def splits(text: str) -> list[list[str]]:
    return [[text], list(text), *([text[:i], text[i:]] for i in range(1, len(text)))]


@pytest.mark.parametrize("parser,text,reasoning,content", [
    ("qwen3", "<think>\nLet me see.\n</think>\n\nParis.", "\nLet me see.\n", "\n\nParis."),
    ("qwen3", "  <think>a</think>b", "a", "b"),
    ("qwen3", "Paris.", "", "Paris."),  # enable_thinking false: no tags, all answer
    ("qwen3", "<thi", "", "<thi"),  # looked like a tag, was not
    ("qwen3", "<think>cut by max_tokens", "cut by max_tokens", ""),  # stays reasoning
    ("deepseek_r1", "The user asks.</think>Paris.", "The user asks.", "Paris."),
    ("deepseek_r1", "<think>Written anyway.</think>Paris.", "Written anyway.", "Paris."),
    ("deepseek_r1", "cut before the end", "cut before the end", ""),
    ("deepseek_r1", "a</thin", "a</thin", ""),
])
def test_reasoning_and_answer_in_every_split(parser: str, text: str, reasoning: str, content: str) -> None:
    for pieces in splits(text):
        # The totals equal the whole text's split: a piece of a tag sent early would remain in them.
        got_reasoning, got_content, _ = split(parser, pieces)
        assert (got_reasoning, got_content) == (reasoning, content), pieces


def test_unknown_parser_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        ReasoningStream("r2")


def _chunks(text: str, size: int) -> list[gen_pb.GenerateResponse]:
    parts = [text[i:i + size] for i in range(0, len(text), size)]
    chunks = [gen_pb.GenerateResponse(index=0, text=p, token_ids=[1]) for p in parts]
    chunks[-1].finish_reason = "stop"
    chunks[-1].usage.completion_tokens = len(parts)
    return chunks


def test_the_chat_renderer_puts_reasoning_apart_and_reads_calls_from_the_answer() -> None:
    tools = function_tools([{"type": "function", "function": {"name": "get_time"}}])
    text = '<think>Use the tool.</think>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    options = {"logprobs": False, "include_usage": False, "reasoning_parser": "qwen3",
               "tool_choice": ToolChoice("auto", tools, parser="hermes")}
    whole = ChatRenderer("c", "m", **options)  # type: ignore[arg-type]
    for chunk in _chunks(text, 7):
        whole.add(chunk)
    (choice,) = whole.full()["choices"]
    assert choice["message"]["reasoning_content"] == "Use the tool."
    assert choice["message"]["content"] is None and choice["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_time"]
    for size in (1, 5, 200):
        streamed = ChatRenderer("c", "m", **options)  # type: ignore[arg-type]
        reasoning, content, names, finish = "", "", [], None
        for chunk in _chunks(text, size):
            for event in streamed.event(chunk):
                body = json.loads(event.removeprefix(b"data: "))
                for c in body["choices"]:
                    delta = c["delta"]
                    reasoning += delta.get("reasoning_content") or ""
                    content += delta.get("content") or ""
                    names += [t["function"]["name"] for t in delta.get("tool_calls") or []]
                    finish = c["finish_reason"] or finish
        assert (reasoning, content.strip(), names) == ("Use the tool.", "", ["get_time"])
        assert finish == "tool_calls"
    hidden = ChatRenderer("c", "m", **{**options, "include_reasoning": False})  # type: ignore[arg-type]
    for chunk in _chunks(text, 7):
        hidden.add(chunk)
    assert hidden.full()["choices"][0]["message"]["reasoning_content"] is None


def test_leading_whitespace_is_held_only_so_far() -> None:
    """A reply of blank tokens is not held (and rescanned) without end: past 256 characters of
    leading whitespace it is the answer."""
    stream = ReasoningStream("qwen3")
    sent = "".join(stream.feed(" ").content for _ in range(300))
    assert sent == " " * 300 and stream.finish().content == ""
