"""The ``input`` of a ``GenerateRequest`` (text, token ids or a chat), decoded alike by the router's
and the worker's servicers. Torch-free: the router imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the servicers pass requests in; ChatInput users need no protobuf
    from llmserve.v1 import generation_pb2 as gen_pb


@dataclass(frozen=True)
class ChatInput:
    """A conversation to render with the model's chat template."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    add_generation_prompt: bool = True


def decode_prompt_input(
    request: gen_pb.GenerateRequest, invalid: Callable[[str], Exception]
) -> str | list[int] | ChatInput:
    """The request's input; a missing input, an empty prompt or a message without a role raises
    ``invalid(message)`` (each service's own INVALID_ARGUMENT error). Token ids and messages may
    be empty here: whether that is an error is the caller's to say."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise invalid("missing input: set one of prompt, prompt_token_ids, messages")
    if kind == "prompt":
        if not request.prompt:
            raise invalid("prompt must not be empty")
        return request.prompt
    if kind == "prompt_token_ids":
        return list(request.prompt_token_ids.ids)
    chat = request.messages
    for i, message in enumerate(chat.messages):
        if not message.role:
            raise invalid(f"messages[{i}].role must not be empty")
    add = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    return ChatInput(tuple((m.role, m.content) for m in chat.messages), add)
