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
(both before the chat template is rendered and the text tokenized), ``n``, the stop strings
(matched against the text after every token) and the size and nesting of a structured-output
format (xgrammar's schema conversion costs about the cube of the nesting depth, on the
worker's event loop).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
    ``max_stop_strings`` and ``max_stop_chars``: how many stop strings, and their characters
    together (each is looked for after every token). ``max_format_chars``: characters of a
    structured-output format (the schema, regex or grammar text, or the choices together);
    ``max_format_depth``: nesting of a JSON schema document (objects and arrays).
    ``max_images_per_request``: images of one request (each an encoded file the worker decodes).
    """

    max_n: int = 16
    max_request_id_len: int = 256
    max_chat_turns: int = 1024
    max_prompt_chars: int = 1_000_000
    max_stop_strings: int = 32
    max_stop_chars: int = 1024
    max_format_chars: int = 16384
    max_format_depth: int = 64
    max_images_per_request: int = 8

    def __post_init__(self) -> None:
        for name in _LIMIT_FIELDS:
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

    def check_images(self, count: int) -> None:
        if count > self.max_images_per_request:
            raise too_large("images", count, "images", "max_images_per_request", self.max_images_per_request)

    def check_stop(self, stop: Sequence[str]) -> None:
        """Count and total characters of the stop strings."""
        if len(stop) > self.max_stop_strings:
            raise too_large("stop", len(stop), "strings", "max_stop_strings", self.max_stop_strings)
        chars = sum(len(s) for s in stop)
        if chars > self.max_stop_chars:
            raise too_large("stop", chars, "characters", "max_stop_chars", self.max_stop_chars)

    def check_format(self, kind: str, text: str | None = None, choices: Sequence[str] = ()) -> None:
        """A structured-output format of ``kind`` (``json``, ``regex``, ``grammar``, ``choice``):
        its characters, then (a JSON schema) its nesting. Text that is not JSON passes the depth
        check; the format's own validation names that problem."""
        field = f"structured_output.{kind}"
        chars = len(text) if text is not None else sum(len(c) for c in choices)
        if chars > self.max_format_chars:
            raise too_large(field, chars, "characters", "max_format_chars", self.max_format_chars)
        if kind == "json" and text is not None:
            depth = json_depth(text, self.max_format_depth)
            if depth > self.max_format_depth:
                raise LimitExceeded(
                    "max_format_depth",
                    f"{field} is nested too deeply: more than {self.max_format_depth} levels of objects "
                    f"and arrays; the limit is {self.max_format_depth} "
                    f"(max_format_depth, flag {flag_of('max_format_depth')})",
                )

    def check_prompt(self, prompt: PromptInput) -> None:
        """Turns and characters of a text or chat prompt (token ids are the engine's to count)."""
        if isinstance(prompt, ChatPrompt):
            self.check_chat_turns(len(prompt.messages))
            extra = len(json.dumps(list(prompt.tools), ensure_ascii=False)) if prompt.tools else 0
            if prompt.template_kwargs:
                extra += len(json.dumps(dict(prompt.template_kwargs), ensure_ascii=False))
            self.check_prompt_chars(input_field(prompt), sum(_chars(m) for m in prompt.messages) + extra)
        elif isinstance(prompt, str):
            self.check_prompt_chars(input_field(prompt), len(prompt))


# Every RequestLimits field with its flag's help (the flag is flag_of(field)).
_LIMIT_HELP: tuple[tuple[str, str], ...] = (
    ("max_n", "most samples (n) of one request"),
    ("max_request_id_len", "longest request_id, in characters"),
    ("max_chat_turns", "most messages in a chat, counted before the template is rendered"),
    ("max_prompt_chars", "longest text prompt (or chat roles + contents), counted before tokenizing"),
    ("max_stop_strings", "most stop strings of one request"),
    ("max_stop_chars", "most characters of a request's stop strings together"),
    ("max_format_chars", "longest structured-output format (schema, regex, grammar, or choices together)"),
    ("max_format_depth", "deepest nesting of objects and arrays in a structured-output JSON schema"),
    ("max_images_per_request", "most images of one request (a model that takes images)"),
)
_LIMIT_FIELDS = tuple(name for name, _ in _LIMIT_HELP)


def json_depth(text: str, bound: int) -> int:
    """Nesting depth of the JSON ``text`` (a scalar is 0, ``[]`` is 1), or ``bound + 1`` once it
    is known to pass ``bound`` (also when the parser itself gives up on the nesting); 0 for text
    that is not JSON."""
    try:
        value = json.loads(text)
    except RecursionError:
        return bound + 1
    except ValueError:
        return 0
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:  # iterative: the depth being measured must not cost Python stack
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > bound:
            return bound + 1
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _chars(message: Mapping[str, Any]) -> int:
    """A message's role and content, plus its tool calls as JSON (an assistant's earlier calls)."""
    role, content = message.get("role"), message.get("content")
    chars = (len(role) if isinstance(role, str) else 0) + (len(content) if isinstance(content, str) else 0)
    if isinstance(content, list):  # content parts (a message with images): their texts count
        chars += sum(len(p["text"]) for p in content
                     if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    calls = message.get("tool_calls")
    return chars + (len(json.dumps(calls, ensure_ascii=False)) if calls else 0)


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The per-request limit flags, the same on router and worker (one ``RequestLimits`` field each)."""
    defaults = RequestLimits()
    group = parser.add_argument_group("admission limits (INVALID_ARGUMENT beyond; docs/CONFIG.md)")
    for name, text in _LIMIT_HELP:
        group.add_argument(flag_of(name), type=int, default=getattr(defaults, name), help=text)
    group.add_argument("--max-metadata-bytes", type=int, default=8192,
                       help="largest gRPC metadata of a call (RESOURCE_EXHAUSTED from the transport beyond)")


def limits_from_args(args: argparse.Namespace) -> RequestLimits:
    """The ``RequestLimits`` of parsed :func:`add_limit_flags` flags (ValueError when out of range)."""
    return RequestLimits(**{name: getattr(args, name) for name in _LIMIT_FIELDS})
