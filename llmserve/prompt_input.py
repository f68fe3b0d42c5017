"""The input of a request (text, token ids or a chat), as router, worker and offline API take it.

One type per concept, shared by every side and torch-free (the router imports it):
:data:`PromptInput` is what a caller may send and :class:`ChatPrompt` a conversation.
:func:`check_prompt_input` is the one place that refuses an empty input; the servicers decode
``GenerateRequest.input`` with :func:`decode_prompt_input`, which applies it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the servicers pass requests in; offline users need no protobuf
    from llmserve.limits import RequestLimits
    from llmserve.v1 import generation_pb2 as gen_pb


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation to render with the model's chat template.

    ``messages`` are mappings with at least ``role`` and ``content`` (as ``apply_chat_template``
    takes them; an assistant's ``tool_calls`` and a tool result's ``tool_call_id`` too).
    ``continue_final_message``: the last message is left open for the model to continue (a
    prefill of its answer); it excludes ``add_generation_prompt``. ``tools``: function
    definitions (OpenAI's ``tools``) for the template to show the model. ``template_kwargs``:
    more variables for the template (vLLM's ``chat_template_kwargs``, e.g. Qwen3's
    ``enable_thinking``).
    """

    messages: Sequence[Mapping[str, Any]]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: Sequence[Mapping[str, Any]] | None = None
    template_kwargs: Mapping[str, Any] | None = None


PromptInput = str | Sequence[int] | ChatPrompt
CONTINUE_NEEDS_NO_GENERATION_PROMPT = (
    "continue_final_message needs add_generation_prompt false (they exclude each other)")


def input_field(prompt: PromptInput) -> str:
    """The request field the client used for ``prompt`` (errors name it, whatever the router made
    of it): ``messages``, ``prompt`` or ``prompt_token_ids``."""
    if isinstance(prompt, ChatPrompt):
        return "messages"
    return "prompt" if isinstance(prompt, str) else "prompt_token_ids"


def truncate_prompt(ids: Sequence[int], keep: int | None, max_model_len: int) -> Sequence[int]:
    """vLLM's ``truncate_prompt_tokens``: the last ``keep`` prompt token ids (-1: as many as the
    context holds with room for one output token); ``ids`` as they are when ``keep`` is None or
    not shorter. ``ValueError`` naming the parameter when ``keep`` leaves no room for output."""
    if keep is None:
        return ids
    if keep == -1:
        keep = max_model_len - 1
    if not 1 <= keep < max_model_len:
        raise ValueError(f"truncate_prompt_tokens must be -1 or in [1, {max_model_len}) (the model's "
                         f"context, max_model_len, less one token for the output), got {keep}")
    return ids[-keep:] if len(ids) > keep else ids


def _is_parts(content: Any) -> bool:
    """Whether ``content`` is a list of content parts as multimodal chat templates take them:
    ``{"type": "text", "text": str}`` and ``{"type": "image"}`` (its picture travels apart)."""
    return isinstance(content, list) and bool(content) and all(
        isinstance(part, Mapping) and (
            (part.get("type") == "text" and isinstance(part.get("text"), str)) or part.get("type") == "image")
        for part in content)


def template_messages(chat: ChatPrompt) -> list[dict[str, Any]]:
    """The messages as chat templates take them: a ``content`` of None (an assistant turn of
    tool calls) as "", which every template can concatenate."""
    return [{**m, "content": m.get("content") or ""} for m in chat.messages]


def check_template_kwargs(kwargs: Mapping[str, Any] | None, apply_chat_template: Callable[..., Any]) -> None:
    """``ValueError`` naming ``chat_template_kwargs`` for a name it may not set: not an
    identifier, one of ``apply_chat_template``'s own parameters (``tokenize`` would make it
    return ids), the conversation, or a special token (``*_token``)."""
    if not kwargs:
        return
    try:
        reserved = set(inspect.signature(apply_chat_template).parameters)
    except (TypeError, ValueError):
        reserved = set()
    reserved |= {"messages", "conversation", "kwargs", "self"}
    for name in kwargs:
        if not isinstance(name, str) or not name.isidentifier() or name in reserved \
                or name.endswith("_token"):
            raise ValueError(f"chat_template_kwargs: {name!r} cannot be set (not a name, or one the renderer "
                             "or the tokenizer's special tokens own)")


def check_prompt_input(prompt: PromptInput) -> None:
    """Raise ``ValueError`` naming the field when ``prompt`` is empty or malformed.

    Text must be non-empty, token ids a non-empty list of integers, a chat at least one message,
    each with a non-empty string ``role`` and a string ``content`` (or a list of text and image
    parts, a message with images). Whether the ids fit the
    model (vocabulary, context length) is the engine's to say.
    """
    if isinstance(prompt, ChatPrompt):
        if not prompt.messages:
            raise ValueError("messages must not be empty")
        if prompt.continue_final_message and prompt.add_generation_prompt:
            raise ValueError(CONTINUE_NEEDS_NO_GENERATION_PROMPT)
        for i, message in enumerate(prompt.messages):
            # An assistant turn of tool calls may have no content (OpenAI's null).
            no_content = isinstance(message, Mapping) and message.get("content") is None \
                and bool(message.get("tool_calls"))
            has_content = isinstance(message, Mapping) and (
                isinstance(message.get("content"), str) or _is_parts(message.get("content")))
            if not (has_content or no_content):
                raise ValueError(f"messages[{i}] must have a role and a content")
            role = message.get("role")
            if not isinstance(role, str) or not role:
                raise ValueError(f"messages[{i}].role must not be empty")
        return
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt must not be empty")
        return
    if not isinstance(prompt, Sequence):
        raise ValueError(f"prompt must be a string, a list of token ids or a ChatPrompt, got {type(prompt)}")
    if not prompt:
        raise ValueError("prompt_token_ids must not be empty")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ValueError("prompt_token_ids must be a list of integers")


def decode_prompt_input(
    request: gen_pb.GenerateRequest, invalid: Callable[[str], Exception], limits: RequestLimits | None = None
) -> PromptInput:
    """The request's input, checked by :func:`check_prompt_input`; a missing or empty input
    raises ``invalid(message)`` (each service's own INVALID_ARGUMENT error). With ``limits``, a
    chat's turns are counted before any message is copied and the prompt's characters checked
    (``LimitExceeded``)."""
    kind = request.WhichOneof("input")
    prompt: PromptInput
    if kind is None:
        raise invalid("missing input: set one of prompt, prompt_token_ids, messages")
    if kind == "prompt":
        prompt = request.prompt
    elif kind == "prompt_token_ids":
        prompt = list(request.prompt_token_ids.ids)
    else:
        chat = request.messages
        if limits is not None:
            limits.check_chat_turns(len(chat.messages))
        add = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        prompt = ChatPrompt(tuple({"role": m.role, "content": m.content} for m in chat.messages), add,
                            chat.continue_final_message)
    if limits is not None:
        limits.check_prompt(prompt)
    try:
        check_prompt_input(prompt)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    return prompt
