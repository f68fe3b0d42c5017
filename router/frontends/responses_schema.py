"""OpenAI's Responses API request (``POST /v1/responses``), validated and turned into a chat.

A Responses request is a chat completion in another shape, so the door serves it as one: the
conversation (the stored one of ``previous_response_id``, then ``instructions`` as the system
message, then ``input``) becomes chat messages, and the request's parameters chat's
(:meth:`ResponsesRequest.chat_body`, validated by ``ChatCompletionRequest``):

- ``input``: a string (one user message) or items: messages (``role`` user, assistant, system or
  developer, which templates know as system; ``content`` a string or ``input_text`` /
  ``output_text`` / ``refusal`` parts), ``function_call`` (a call the model made: it joins the
  assistant message before it, as chat's ``tool_calls``) and ``function_call_output`` (a tool
  message); ``reasoning`` items are dropped (templates drop earlier reasoning too). Images,
  files, audio, ``item_reference`` and other item types are refused naming the item.
- ``tools``: function tools (``{"type": "function", "name", "parameters"}``); the hosted tools
  (web search, file search, MCP, ...) are refused. ``tool_choice`` ``none`` / ``auto`` /
  ``required`` / ``{"type": "function", "name"}`` as chat's.
- ``text.format`` (``text``, ``json_object``, ``json_schema``) is chat's ``response_format``;
  ``max_output_tokens`` its ``max_completion_tokens``; ``top_logprobs`` or ``include``
  ``message.output_text.logprobs`` its logprobs; ``reasoning.effort`` the template's
  ``reasoning_effort`` (vLLM's).
- vLLM's sampling extras (``top_k``, ``min_p``, ``seed``, ``stop``, ...) pass to chat as they are.

``prompt`` (stored prompts), ``conversation`` and ``truncation`` "auto" are refused: this server
keeps no prompts or conversations other than stored responses, and truncating a conversation
silently is not what a client asking for an answer to it expects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from router.frontends.openai_errors import InvalidParam
from router.frontends.openai_schemas import MAX_LOGPROBS, UINT32_END, ChatCompletionRequest, validate

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# ``include`` values taken: logprobs; encrypted reasoning is accepted and never sent (this server
# returns its reasoning in the clear, when its model has a reasoning parser).
_KNOWN_INCLUDES = frozenset({LOGPROBS_INCLUDE, "reasoning.encrypted_content"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
MAX_METADATA_PAIRS = 16  # OpenAI's limits on ``metadata``
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
# vLLM's sampling extras a Responses request may carry; chat validates them under the same names.
_CHAT_EXTRAS = ("top_k", "min_p", "repetition_penalty", "seed", "presence_penalty", "frequency_penalty",
                "stop", "stop_token_ids", "ignore_eos", "min_tokens", "logit_bias", "priority",
                "allowed_token_ids", "bad_words", "include_reasoning", "structured_outputs")


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``: OpenAI's fields (validated here) and vLLM's extras (by chat)."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    input: str | list[Any]
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, lt=UINT32_END)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    include: list[str] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    background: bool = False
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled", "auto"] | None = None
    prompt: Any = None
    conversation: Any = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        """What the fields' types do not say; :class:`InvalidParam` naming the parameter."""
        if self.prompt is not None:
            raise InvalidParam("prompt", "prompt (a stored prompt template) is not supported: send input")
        if self.conversation is not None:
            raise InvalidParam("conversation", "conversation is not supported: chain responses with "
                               "previous_response_id")
        if self.truncation == "auto":
            raise InvalidParam("truncation", "truncation \"auto\" is not supported: a conversation over the "
                               "model's context is refused, never cut")
        if isinstance(self.input, str) and not self.input or isinstance(self.input, list) and not self.input:
            raise InvalidParam("input", "input must not be empty")
        for value in self.include or []:
            if value not in _KNOWN_INCLUDES:
                raise InvalidParam("include", f"include {value!r} is not supported; supported: "
                                   f"{', '.join(sorted(_KNOWN_INCLUDES))}")
        metadata = self.metadata or {}
        too_long = any(len(k) > MAX_METADATA_KEY_CHARS or len(v) > MAX_METADATA_VALUE_CHARS
                       for k, v in metadata.items())
        if len(metadata) > MAX_METADATA_PAIRS or too_long:
            raise InvalidParam("metadata", f"metadata holds at most {MAX_METADATA_PAIRS} pairs, keys of at "
                               f"most {MAX_METADATA_KEY_CHARS} and values of at most "
                               f"{MAX_METADATA_VALUE_CHARS} characters")
        if self.background and self.stream:
            raise InvalidParam("background", "background with stream is not supported: poll "
                               "GET /v1/responses/{id} for a background response")
        if self.background and not self.store:
            raise InvalidParam("background", "background needs store (its result is read back from the "
                               "store)")

    @property
    def wants_logprobs(self) -> bool:
        return self.top_logprobs is not None or LOGPROBS_INCLUDE in (self.include or [])

    def input_messages(self) -> list[dict[str, Any]]:
        """``input`` as chat messages (in ``ChatMessageIn``'s shape)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return items_as_messages(self.input, "input")

    def chat_body(self, history: list[dict[str, Any]], raw: Mapping[str, Any]) -> dict[str, Any]:
        """The chat completion request this one is: ``history`` (a stored conversation) and this
        request's messages, its parameters in chat's names; ``raw``: the request body (vLLM's
        extras pass on from it unchanged)."""
        messages = list(history)
        if self.instructions:
            messages.insert(0, {"role": "system", "content": self.instructions})
        messages += self.input_messages()
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "parallel_tool_calls": self.parallel_tool_calls}
        optional = {"max_completion_tokens": self.max_output_tokens, "temperature": self.temperature,
                    "top_p": self.top_p, "user": self.user}
        body.update({k: v for k, v in optional.items() if v is not None})
        if self.wants_logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        if self.tools:
            body["tools"] = chat_tools(self.tools)
        if self.tool_choice is not None:
            body["tool_choice"] = chat_tool_choice(self.tool_choice)
        response_format = chat_response_format(self.text)
        if response_format is not None:
            body["response_format"] = response_format
        template_kwargs = dict(self.chat_template_kwargs or {})
        effort = (self.reasoning or {}).get("effort")
        if effort is not None:
            if not isinstance(effort, str):
                raise InvalidParam("reasoning.effort", "reasoning.effort must be a string")
            template_kwargs.setdefault("reasoning_effort", effort)
        if template_kwargs:
            body["chat_template_kwargs"] = template_kwargs
        for name in _CHAT_EXTRAS:
            if name in raw:
                body[name] = raw[name]
        return body

    def chat_request(self, history: list[dict[str, Any]], raw: Mapping[str, Any]) -> ChatCompletionRequest:
        """:meth:`chat_body`, validated as chat (a refusal names chat's parameter, which is the
        Responses one for everything but the conversation)."""
        try:
            return validate(ChatCompletionRequest, self.chat_body(history, raw))
        except InvalidParam as exc:
            if exc.param.startswith("messages"):  # what the client sent as input
                raise InvalidParam("input", str(exc)) from None
            raise


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or its text parts joined by newlines (chat's rule)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidParam(where, f"{where} must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise InvalidParam(f"{where}[{j}]", f"{where}[{j}]: only text parts are supported (input_text, "
                               f"output_text), got {kind!r}")
    return "\n".join(texts)


def _content_of(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content as chat takes it: :func:`_text_of`, or with ``input_image`` parts
    (``image_url`` a ``data:`` URL, the router fetches nothing) the list of text and
    ``image_url`` parts in order (docs/MULTIMODAL.md)."""
    if not isinstance(content, list) or not any(
            isinstance(p, dict) and p.get("type") == "input_image" for p in content):
        return _text_of(content, where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise InvalidParam(f"{where}[{j}]", f"{where}[{j}]: an input_image needs its image_url "
                                   "(a data: URL); file_id is not served")
            if not url.startswith("data:"):
                raise InvalidParam(f"{where}[{j}]", f"{where}[{j}].image_url: only data: URLs "
                                   "(data:image/png;base64,...) are served; nothing is fetched")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            parts.append({"type": "text", "text": _text_of([part], f"{where}[{j}]")})
    return parts


def _string(item: Mapping[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidParam(f"{where}.{name}", f"{where}.{name} must be a non-empty string")
    return value


def items_as_messages(items: list[Any], param: str) -> list[dict[str, Any]]:
    """Responses items as chat messages: a ``function_call`` joins the assistant message just
    before it (calls made in one turn are one message's ``tool_calls``), a
    ``function_call_output`` is a tool message; reasoning is dropped."""
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise InvalidParam(where, f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
            if role is None:
                raise InvalidParam(f"{where}.role",
                                   f"{where}.role must be user, assistant, system or developer")
            messages.append({"role": role, "content": _content_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            arguments = item.get("arguments")
            try:
                parsed = json.loads(arguments) if isinstance(arguments, str) else None
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                raise InvalidParam(f"{where}.arguments", f"{where}.arguments must be a JSON object's text")
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                             "content": _text_of(output, f"{where}.output")})
        elif kind != "reasoning":
            raise InvalidParam(f"{where}.type", f"{where}.type {kind!r} is not supported (message, "
                               "function_call, function_call_output and reasoning are)")
    return messages


def chat_tools(tools: list[Any]) -> list[dict[str, Any]]:
    """Responses function tools in chat's shape; hosted tools are refused."""
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise InvalidParam(f"tools[{i}].type", f"tools[{i}]: only function tools are supported, got "
                               f"{kind!r}")
        function = {"name": tool.get("name")}
        for name in ("description", "parameters", "strict"):
            if tool.get(name) is not None:
                function[name] = tool[name]
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: Any) -> Any:
    """A Responses ``tool_choice`` in chat's shape (a named function is nested there)."""
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidParam("tool_choice", "tool_choice must be \"none\", \"auto\", \"required\" or "
                       "{\"type\": \"function\", \"name\": ...}")


def chat_response_format(text: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format`` (None: free text)."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidParam("text.format.schema", "text.format.schema must be a JSON schema (an object)")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", ""), "schema": fmt["schema"]}}
    raise InvalidParam("text.format.type", "text.format.type must be text, json_object or json_schema")


def text_config(text: Mapping[str, Any] | None) -> dict[str, Any]:
    """The response's ``text`` as it echoes the request's (``{"format": {"type": "text"}}`` by default)."""
    fmt = (text or {}).get("format")
    return {"format": fmt if isinstance(fmt, dict) else {"type": "text"}}
