"""Tool calling at the OpenAI door (``tools`` / ``tool_choice`` of chat completions), as vLLM serves it.

* ``tool_choice`` a named function: the output is that function's arguments, constrained by
  structured output to its ``parameters`` schema; ``"required"``: a JSON array of
  ``{"name", "parameters"}`` calls, constrained to the tools' schemas; both turned into
  ``tool_calls`` here. ``"none"``: plain text.
* ``"auto"``: the model decides, in its own format, which a *tool-call parser* reads from the
  text (a router flag per model, as vLLM's ``--tool-call-parser``):

  - ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, text before
    the first one is the reply's content (Hermes, Qwen 2.5 / 3 and others' templates);
  - ``llama3_json``: a reply that is ``{"name": ..., "parameters": {...}}`` objects separated by
    ``;`` (Llama 3.1 / 3.2 / 3.3; their ``<|python_tag|>`` is a special token, not in the text);
  - ``mistral``: ``[TOOL_CALLS]`` then a JSON array of ``{"name", "arguments"}`` (Mistral v0.3 and
    later); the marker is a special token, dropped with the others from the text, so a reply
    that is such an array is read as calls too.

:class:`ToolCallStream` turns one choice's text, whole or streamed, into the message's
``content`` and ``tool_calls`` (streamed: OpenAI's deltas). Nothing from the model's text is
evaluated: arguments are JSON text, parsed only to check it is an object.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_MISTRAL_OPEN = "[TOOL_CALLS]"
# Leading whitespace held back while a reply may still turn out to be calls (or reasoning): past
# this much it is a text reply (and holding more would rescan a growing text at every chunk).
MAX_LEADING_SPACE = 256
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
    return _calls_from(items, ("parameters",))


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


def _calls_from(items: Any, arguments_keys: tuple[str, ...]) -> list[ToolCall] | None:
    """``[{"name", <arguments key>: {...}}, ...]`` as calls; None when ``items`` is not that."""
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        key = next((k for k in arguments_keys if k in item), None)
        arguments = _json_object_text(item[key]) if key is not None else None
        if arguments is None:
            return None
        calls.append(ToolCall(item["name"], arguments))
    return calls


def parse_llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    """Llama 3's JSON calls: the whole reply is ``{...}`` objects joined by ``;`` (``parameters``, or
    ``arguments``); anything else is content."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return text, []
    decoder, items, at = json.JSONDecoder(), [], 0
    try:
        while at < len(stripped):
            item, at = decoder.raw_decode(stripped, at)
            items.append(item)
            rest = stripped[at:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            at = len(stripped) - len(rest)
    except ValueError:
        return text, []
    calls = _calls_from(items, ("parameters", "arguments"))
    return (None, calls) if calls else (text, [])


def parse_mistral(text: str) -> tuple[str | None, list[ToolCall]]:
    """Mistral's calls: ``[TOOL_CALLS]`` (when the text kept it) then a JSON array of
    ``{"name", "arguments"}``; the text before the marker is the content."""
    start = text.find(_MISTRAL_OPEN)
    body = text[start + len(_MISTRAL_OPEN):] if start >= 0 else text
    try:
        items = json.loads(body)
    except ValueError:
        return text, []
    calls = _calls_from(items, ("arguments", "parameters"))
    if not calls:
        return text, []
    content = text[:start].strip() if start >= 0 else ""
    return content or None, calls


@dataclass(frozen=True)
class _Parser:
    """Where a parser's calls start in a reply (-1: not yet; ``opening``: the text held back while
    it could still become a start) and how the text from there reads."""

    marker: str | None  # a tag anywhere in the text (None: calls make the whole reply)
    openers: tuple[str, ...]  # without a marker: the characters a reply of calls starts with
    parse: Callable[[str], tuple[str | None, list[ToolCall]]]

    def start(self, tail: str, fresh: bool) -> int:
        """Where calls start in ``tail`` (the text not streamed yet; ``fresh``: none was)."""
        if self.marker is not None:
            at = tail.find(self.marker)
            if at >= 0 or not self.openers:
                return at
        stripped = tail.lstrip()
        return len(tail) - len(stripped) if fresh and stripped.startswith(self.openers) else -1

    def opening(self, tail: str, fresh: bool) -> int:
        """Characters at the end of ``tail`` to hold back: they may still start calls."""
        if self.openers and fresh and not tail.strip() and len(tail) <= MAX_LEADING_SPACE:
            return len(tail)  # only whitespace so far: a reply of calls may still start
        return held_prefix(tail, self.marker) if self.marker is not None else 0


_PARSERS = {
    "hermes": _Parser(_HERMES_OPEN, (), parse_hermes),
    "llama3_json": _Parser(None, ("{",), parse_llama3_json),
    "mistral": _Parser(_MISTRAL_OPEN, ("[",), parse_mistral),
}


def held_prefix(text: str, tag: str) -> int:
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
        # The pieces, joined only at the end: joining on every chunk would cost a long reply
        # quadratic time on the router's event loop.
        self._parts: list[str] = []
        self._named_id = new_call_id() if choice.kind == "named" else None
        self._sent_content = 0  # characters of the text streamed as content
        self._tail = ""  # auto: text after those, held back while it may start a call
        self._holding = False  # auto: a call started, the rest waits for the end
        self.calls: list[ToolCall] = []

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def called(self) -> bool:
        """Whether the reply is tool calls (its finish reason is then ``tool_calls``, except for a
        named function's, as vLLM reports)."""
        return bool(self.calls)

    def feed(self, chunk: str) -> dict[str, Any]:
        self._parts.append(chunk)
        kind = self.choice.kind
        if kind == "named":
            first = len(self._parts) == 1
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
        parser = _PARSERS[self.choice.parser]
        tail, fresh = self._tail + chunk, self._sent_content == 0
        start = parser.start(tail, fresh)
        end = start if start >= 0 else len(tail) - parser.opening(tail, fresh)
        self._holding = start >= 0
        out, self._tail = tail[:end], tail[end:]
        self._sent_content += len(out)
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
            content, calls = _PARSERS[self.choice.parser].parse(held)
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
            content, _ = _PARSERS[self.choice.parser].parse(self.text)
            return {"role": "assistant", "content": content, "tool_calls": [c.message() for c in self.calls]}
        return {"role": "assistant", "content": self.text}
