"""Tool calling at the OpenAI door (``tools`` / ``tool_choice`` of chat completions), as vLLM serves it.

* ``tool_choice`` a named function: the output is that function's arguments, constrained by
  structured output to its ``parameters`` schema; ``"required"``: a JSON array of
  ``{"name", "parameters"}`` calls, constrained to the tools' schemas; both turned into
  ``tool_calls`` here. ``"none"``: plain text.
* ``"auto"``: the model decides, in its own format, which a *tool-call parser* reads from the
  text (a router flag per model, as vLLM's ``--tool-call-parser``). ``hermes``: calls as
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, text before the first one is the
  reply's content (Hermes, Qwen 2.5 / 3 and others' templates).

:class:`ToolCallStream` turns one choice's text, whole or streamed, into the message's
``content`` and ``tool_calls`` (streamed: OpenAI's deltas). Nothing from the model's text is
evaluated: arguments are JSON text, parsed only to check it is an object.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

TOOL_CALL_PARSERS = ("hermes",)
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's function names


@dataclass(frozen=True)
class FunctionTool:
    """One function of a request's ``tools``: its name and its arguments' JSON schema."""

    name: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class ToolChoice:
    """How the request uses its tools: ``none``, ``auto`` (``parser`` reads the calls),
    ``required`` (at least one call; one at most without ``parallel``) or ``named`` (``name``)."""

    kind: Literal["none", "auto", "required", "named"]
    tools: tuple[FunctionTool, ...] = ()
    name: str | None = None
    parallel: bool = True
    parser: str | None = None

    def structured_output(self) -> dict[str, Any] | None:
        """The format the output is constrained to (``{"json": schema}``; None: free text)."""
        if self.kind == "named":
            tool = next(t for t in self.tools if t.name == self.name)
            return {"json": dict(tool.parameters)}
        if self.kind != "required":
            return None
        calls = [{"type": "object",
                  "properties": {"name": {"enum": [t.name]}, "parameters": dict(t.parameters)},
                  "required": ["name", "parameters"]} for t in self.tools]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return {"json": schema}


def function_tools(tools: Sequence[Any]) -> tuple[FunctionTool, ...]:
    """A request's ``tools``, checked (ValueError naming the problem)."""
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(
                tool.get("function"), Mapping):
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '.' or '-'")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema (an object)")
        out.append(FunctionTool(name, parameters))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError("tools must have distinct function names")
    return tuple(out)


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: a function name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)

    def message(self) -> dict[str, Any]:
        """As in an assistant message's ``tool_calls``."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def _json_object_text(value: Any) -> str | None:
    """``value`` (arguments the model wrote) as compact JSON text of an object; None otherwise."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def parse_required(text: str) -> list[ToolCall] | None:
    """``required``'s output (``[{"name", "parameters"}, ...]``) as calls; None when it is not
    one (cut by ``max_tokens``)."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = _json_object_text(item.get("parameters"))
        if arguments is None:
            return None
        calls.append(ToolCall(item["name"], arguments))
    return calls


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """Hermes-format calls in ``text``: (the content before the first call, or the whole text
    when there is no well-formed call; the calls). An unclosed last call (cut by
    ``max_tokens``) is read to the end of the text."""
    start = text.find(_HERMES_OPEN)
    if start < 0:
        return text, []
    calls = []
    rest = text[start:]
    while rest.startswith(_HERMES_OPEN):
        end = rest.find(_HERMES_CLOSE)
        body = rest[len(_HERMES_OPEN): end if end >= 0 else len(rest)]
        try:
            value = json.loads(body)
        except ValueError:
            return text, []
        arguments = _json_object_text(value.get("arguments")) if isinstance(value, dict) else None
        if arguments is None or not isinstance(value.get("name"), str):
            return text, []
        calls.append(ToolCall(value["name"], arguments))
        rest = rest[end + len(_HERMES_CLOSE):].lstrip() if end >= 0 else ""
    if rest:  # text after the calls that is no call: not a tool-call reply after all
        return text, []
    content = text[:start].strip()
    return content or None, calls


def _held_prefix(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could start ``tag`` (kept back while streaming)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ToolCallStream:
    """One choice's text as an assistant message with tool calls, fed chunk by chunk.

    :meth:`feed` returns the delta to stream for a chunk (``content`` and / or ``tool_calls``;
    empty while text is held back); :meth:`finish` the last one and :meth:`message` the whole
    message. ``named`` streams the arguments as they come; ``required`` and ``auto`` (once a
    call starts) hold the text until the end, where it is parsed (text that is no call after
    all is sent as content).
    """

    def __init__(self, choice: ToolChoice) -> None:
        self.choice = choice
        self._text: list[str] = []
        self._named_id = new_call_id() if choice.kind == "named" else None
        self._sent_content = 0  # characters of the text streamed as content
        self._holding = False  # auto: a call started, the rest waits for the end
        self.calls: list[ToolCall] = []

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def called(self) -> bool:
        """Whether the reply is tool calls (its finish reason is then ``tool_calls``, except for a
        named function's, as vLLM reports)."""
        return bool(self.calls)

    def feed(self, chunk: str) -> dict[str, Any]:
        self._text.append(chunk)
        kind = self.choice.kind
        if kind == "named":
            first = len(self._text) == 1
            call: dict[str, Any] = {"index": 0, "function": {"arguments": chunk}}
            if first:
                assert self._named_id is not None and self.choice.name is not None
                call = {"index": 0, "id": self._named_id, "type": "function",
                        "function": {"name": self.choice.name, "arguments": chunk}}
            return {"tool_calls": [call]}
        if kind == "required" or self._holding:
            return {}
        if kind == "none" or self.choice.parser is None:
            return {"content": chunk}
        text = self.text
        start = text.find(_HERMES_OPEN, self._sent_content)
        end = start if start >= 0 else len(text) - _held_prefix(text, _HERMES_OPEN)
        if start >= 0:
            self._holding = True
        out = text[self._sent_content: end]
        self._sent_content = end
        return {"content": out} if out else {}

    def finish(self) -> dict[str, Any]:
        """The delta that ends the choice: held text as calls (or as content)."""
        kind = self.choice.kind
        if kind == "named":
            assert self.choice.name is not None and self._named_id is not None
            self.calls = [ToolCall(self.choice.name, self.text, self._named_id)]
            return {}
        text = self.text
        held = text[self._sent_content:]
        if kind == "required":
            calls = parse_required(text)
            if calls is None:
                self._sent_content = len(text)
                return {"content": held} if held else {}
            self.calls = calls
        elif kind == "auto" and self.choice.parser is not None:
            content, calls = parse_hermes(held)
            if not calls:
                self._sent_content = len(text)
                return {"content": held} if held else {}
            self.calls = calls
            if content:  # never: streamed text stops at the first call's tag
                return {"content": content}
        else:
            return {"content": held} if held else {}
        return {"tool_calls": [{"index": i, **call.message()} for i, call in enumerate(self.calls)]}

    def message(self) -> dict[str, Any]:
        """The whole assistant message (after :meth:`finish`)."""
        kind = self.choice.kind
        if kind == "named" or (kind == "required" and self.calls):
            return {"role": "assistant", "content": None, "tool_calls": [c.message() for c in self.calls]}
        if kind == "auto" and self.choice.parser is not None and self.calls:
            content, _ = parse_hermes(self.text)
            return {"role": "assistant", "content": content, "tool_calls": [c.message() for c in self.calls]}
        return {"role": "assistant", "content": self.text}
