"""A Responses API response's output items, built from its chat deltas, and its stream events.

The door renders a response's chunks as chat does (``openai_responses.ChatRenderer``: reasoning
split off, tool calls parsed) and feeds each chat delta here. :class:`ResponseOutput` keeps the
output items (a ``reasoning`` item, a ``message`` with one ``output_text`` part, ``function_call``
items, in the order the model wrote them) and returns the events OpenAI streams for them:

``response.output_item.added``, then ``response.content_part.added`` and
``response.output_text.delta`` (``response.reasoning_text.delta`` for reasoning,
``response.function_call_arguments.delta`` for a call), and when the item ends its ``.done``
events and ``response.output_item.done``. Every event carries the stream's next
``sequence_number``. A whole (not streamed) response is built by the same calls, its events
dropped, so it equals what the stream would have shown.

An output text's ``logprobs`` are the chat logprobs of the chunks whose text it shows, and of
the text-less chunks after it (the end-of-sequence token); a chunk that was only reasoning (or
held back as a possible tool call, then not one) has none there.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "incomplete", "failed", "cancelled"})
STATUSES: frozenset[str] = TERMINAL_STATUSES | {"queued", "in_progress"}


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class _Item:
    """One output item being written: its JSON, where it is, its text so far."""

    index: int  # output_index
    body: dict[str, Any]
    parts: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts)


class ResponseOutput:
    """The output items of one response and the events that stream them (see the module)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []  # by output_index; an open item is its body so far
        self._seq = 0
        self._text: _Item | None = None  # the open reasoning or message item
        self._calls: dict[int, _Item] = {}  # open function calls, by the chat delta's call index
        self.reasoning_tokens = 0

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """One stream event of type ``kind`` with the next sequence number."""
        out = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return out

    def _open(self, body: dict[str, Any]) -> tuple[_Item, dict[str, Any]]:
        item = _Item(len(self.items), body)
        self.items.append(body)
        return item, self.event("response.output_item.added", output_index=item.index, item=dict(body))

    def _open_text(self, kind: Literal["reasoning", "message"]) -> list[dict[str, Any]]:
        """Close the open text item when it is of the other kind, then open one of ``kind``."""
        if self._text is not None and self._text.body["type"] == kind:
            return []
        events = self._close_text("completed")
        if kind == "reasoning":
            body: dict[str, Any] = {"id": _item_id("rs"), "type": "reasoning", "summary": [], "content": [],
                                    "status": "in_progress"}
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
        else:
            body = {"id": _item_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self._text, added = self._open(body)
        events += [added, self.event("response.content_part.added", item_id=body["id"],
                                     output_index=self._text.index, content_index=0, part=part)]
        return events

    def _close_text(self, status: str) -> list[dict[str, Any]]:
        item, self._text = self._text, None
        if item is None:
            return []
        body, text = item.body, item.text
        common = {"item_id": body["id"], "output_index": item.index, "content_index": 0}
        if body["type"] == "reasoning":
            part: dict[str, Any] = {"type": "reasoning_text", "text": text}
            done = self.event("response.reasoning_text.done", **common, text=text)
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": item.logprobs}
            done = self.event("response.output_text.done", **common, text=text, logprobs=item.logprobs)
        body.update(content=[part], status=status)
        return [done, self.event("response.content_part.done", **common, part=part),
                self.event("response.output_item.done", output_index=item.index, item=body)]

    def feed(self, delta: dict[str, Any], logprobs: list[dict[str, Any]] | None, tokens: int = 0
             ) -> list[dict[str, Any]]:
        """The events of one chat delta (``reasoning_content``, ``content``, ``tool_calls``) and
        the chat logprobs of its tokens (``tokens`` of them)."""
        events: list[dict[str, Any]] = []
        reasoning, content = delta.get("reasoning_content") or "", delta.get("content") or ""
        calls = delta.get("tool_calls") or []
        if reasoning and not content and not calls:
            self.reasoning_tokens += tokens
        if reasoning:
            events += self._open_text("reasoning")
            assert self._text is not None
            self._text.parts.append(reasoning)
            events.append(self.event("response.reasoning_text.delta", item_id=self._text.body["id"],
                                     output_index=self._text.index, content_index=0, delta=reasoning))
        if content:
            events += self._open_text("message")
            assert self._text is not None
            self._text.parts.append(content)
            shown = list(logprobs or [])
            self._text.logprobs += shown
            events.append(self.event("response.output_text.delta", item_id=self._text.body["id"],
                                     output_index=self._text.index, content_index=0, delta=content,
                                     logprobs=shown))
        elif logprobs and self._text is not None and self._text.body["type"] == "message":
            self._text.logprobs += logprobs  # tokens without text (the end of sequence) end the message
        if calls:
            events += self._close_text("completed")
        for call in calls:
            events += self._call_delta(call)
        return events

    def _call_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        function = call.get("function") or {}
        item = self._calls.get(call["index"])
        if item is None:
            body = {"id": _item_id("fc"), "type": "function_call",
                    "call_id": call.get("id") or _item_id("call"), "name": function.get("name") or "",
                    "arguments": "", "status": "in_progress"}
            item, added = self._open(body)
            self._calls[call["index"]] = item
            events.append(added)
        arguments = function.get("arguments") or ""
        if arguments:
            item.parts.append(arguments)
            events.append(self.event("response.function_call_arguments.delta", item_id=item.body["id"],
                                     output_index=item.index, delta=arguments))
        return events

    def finish(self, status: Literal["completed", "incomplete"]) -> list[dict[str, Any]]:
        """Close every open item (a message cut by the token limit is ``incomplete``)."""
        events = self._close_text(status)
        for _, item in sorted(self._calls.items()):
            body = item.body
            body.update(arguments=item.text, status="completed")
            events += [self.event("response.function_call_arguments.done", item_id=body["id"],
                                  output_index=item.index, name=body["name"], arguments=item.text),
                       self.event("response.output_item.done", output_index=item.index, item=body)]
        self._calls = {}
        return events


def usage_object(chat_usage: dict[str, Any] | None, reasoning_tokens: int = 0) -> dict[str, Any] | None:
    """Chat's usage as a response's (``input_tokens`` ...); None when there is none yet."""
    if chat_usage is None:
        return None
    prompt, completion = chat_usage["prompt_tokens"], chat_usage["completion_tokens"]
    cached = chat_usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt + completion}


@dataclass(frozen=True)
class ResponseEcho:
    """What a response repeats of its request (OpenAI's response object shows them)."""

    model: str
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_logprobs: int | None
    tools: tuple[dict[str, Any], ...]
    tool_choice: Any
    parallel_tool_calls: bool
    text: dict[str, Any]
    reasoning: dict[str, Any] | None
    store: bool
    background: bool
    previous_response_id: str | None
    metadata: dict[str, str]
    user: str | None


def response_object(response_id: str, echo: ResponseEcho, status: Status, output: list[dict[str, Any]],
                    usage: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
                    incomplete_reason: str | None = None, created_at: int | None = None) -> dict[str, Any]:
    """OpenAI's response object."""
    return {
        "id": response_id, "object": "response",
        "created_at": created_at if created_at is not None else int(time.time()),
        "status": status, "background": echo.background, "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": echo.instructions, "max_output_tokens": echo.max_output_tokens,
        "max_tool_calls": None, "model": echo.model, "output": list(output),  # as of now
        "parallel_tool_calls": echo.parallel_tool_calls, "previous_response_id": echo.previous_response_id,
        "reasoning": echo.reasoning or {"effort": None, "summary": None}, "store": echo.store,
        "temperature": echo.temperature if echo.temperature is not None else 1.0,
        "text": echo.text, "tool_choice": echo.tool_choice if echo.tool_choice is not None else "auto",
        "tools": list(echo.tools), "top_logprobs": echo.top_logprobs,
        "top_p": echo.top_p if echo.top_p is not None else 1.0, "truncation": "disabled",
        "usage": usage, "user": echo.user, "metadata": echo.metadata,
    }
