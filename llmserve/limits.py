"""Admission limits on one request, shared by router and worker (torch-free).

Every limit is a setting with a command-line flag of the same name (``max_chat_turns`` is
``--max-chat-turns``, env ``LLMSERVE_MAX_CHAT_TURNS``). A request over a limit raises
:class:`LimitExceeded`: a ``ValueError`` whose message starts with the field the client sent and
names the limit and its flag, and whose ``limit`` is the label of the refusal counters
(``llmserve:request_refusals_total`` on the worker, ``llmserve:router_refusals_total`` on the
router). Such a request can never succeed as sent, so it maps to INVALID_ARGUMENT; limits that
depend on load (queue length, queued tokens) are the engine's and map to RESOURCE_EXHAUSTED.

The checks here are the cheap ones that must run *before* any costly work: the request id
(copied into every chunk and log line), the number of chat turns and the prompt's characters
(both before the chat template is rendered and the text tokenized), and ``n``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from llmserve.prompt_input import ChatPrompt, PromptInput, input_field


class LimitExceeded(ValueError):
    """A request over an admission limit. ``limit`` names the setting (a bounded label set)."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


def flag_of(limit: str) -> str:
    """``max_chat_turns`` -> ``--max-chat-turns``."""
    return "--" + limit.replace("_", "-")


def too_large(field: str, value: int, unit: str, limit: str, bound: int) -> LimitExceeded:
    """The one message shape of a refused size: field, value, bound, setting and flag."""
    return LimitExceeded(
        limit, f"{field} is too large: {value} {unit}; the limit is {bound} ({limit}, flag {flag_of(limit)})"
    )


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits checked before the request costs anything.

    ``max_n``: parallel samples of one request (each is a sequence in the engine's queue).
    ``max_request_id_len``: characters of ``request_id``. ``max_chat_turns``: messages of a chat.
    ``max_prompt_chars``: characters of a text prompt, or of a chat's roles and contents together
    (before templating; tokenizing 1M characters costs about 0.7 s of CPU).
    """

    max_n: int = 16
    max_request_id_len: int = 256
    max_chat_turns: int = 1024
    max_prompt_chars: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("max_n", "max_request_id_len", "max_chat_turns", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def check_request_id(self, request_id: str) -> None:
        if len(request_id) > self.max_request_id_len:
            raise too_large("request_id", len(request_id), "characters", "max_request_id_len",
                            self.max_request_id_len)

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise too_large("n", n, "samples", "max_n", self.max_n)

    def check_chat_turns(self, turns: int) -> None:
        if turns > self.max_chat_turns:
            raise too_large("messages", turns, "turns", "max_chat_turns", self.max_chat_turns)

    def check_prompt_chars(self, field: str, chars: int) -> None:
        if chars > self.max_prompt_chars:
            raise too_large(field, chars, "characters", "max_prompt_chars", self.max_prompt_chars)

    def check_prompt(self, prompt: PromptInput) -> None:
        """Turns and characters of a text or chat prompt (token ids are the engine's to count)."""
        if isinstance(prompt, ChatPrompt):
            self.check_chat_turns(len(prompt.messages))
            self.check_prompt_chars(input_field(prompt), sum(_chars(m) for m in prompt.messages))
        elif isinstance(prompt, str):
            self.check_prompt_chars(input_field(prompt), len(prompt))


def _chars(message: Mapping[str, str]) -> int:
    role, content = message.get("role"), message.get("content")
    return (len(role) if isinstance(role, str) else 0) + (len(content) if isinstance(content, str) else 0)


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The per-request limit flags, the same on router and worker (one ``RequestLimits`` field each)."""
    defaults = RequestLimits()
    group = parser.add_argument_group("admission limits (INVALID_ARGUMENT beyond; docs/CONFIG.md)")
    group.add_argument("--max-n", type=int, default=defaults.max_n, help="most samples (n) of one request")
    group.add_argument("--max-request-id-len", type=int, default=defaults.max_request_id_len,
                       help="longest request_id, in characters")
    group.add_argument("--max-chat-turns", type=int, default=defaults.max_chat_turns,
                       help="most messages in a chat, counted before the template is rendered")
    group.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars,
                       help="longest text prompt (or chat roles + contents), counted before tokenizing")
    group.add_argument("--max-metadata-bytes", type=int, default=8192,
                       help="largest gRPC metadata of a call (RESOURCE_EXHAUSTED from the transport beyond)")


def limits_from_args(args: argparse.Namespace) -> RequestLimits:
    """The ``RequestLimits`` of parsed :func:`add_limit_flags` flags (ValueError when out of range)."""
    return RequestLimits(max_n=args.max_n, max_request_id_len=args.max_request_id_len,
                         max_chat_turns=args.max_chat_turns, max_prompt_chars=args.max_prompt_chars)
