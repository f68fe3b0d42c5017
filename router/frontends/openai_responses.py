"""The worker's chunks of one request, shaped as OpenAI responses.

A renderer follows one request: :meth:`ChoiceRenderer.event` turns each ``GenerateResponse``
chunk into the objects of a streamed response (``text_completion`` / ``chat.completion.chunk``),
:meth:`ChoiceRenderer.add` collects chunks for a whole response (:meth:`ChoiceRenderer.full`).
Token texts in logprobs are decoded with the model's tokenizer at the router. ``usage`` carries
``prompt_tokens_details.cached_tokens`` (prompt tokens found in the worker's prefix cache).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmserve.stop_reason import stop_reason
from llmserve.v1 import generation_pb2 as gen_pb
from router.tokenizers import RouterTokenizer

DONE_EVENT = b"data: [DONE]\n\n"


def sse_event(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json_bytes(obj) + b"\n\n"


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def usage_json(usage: gen_pb.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


@dataclass
class _Choice:
    """What one of the ``n`` sequences produced so far."""

    index: int
    texts: list[str] = field(default_factory=list)
    logprobs: list[gen_pb.TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_offset: int = 0  # completions: character offset of the next token (echo included)
    started: bool = False  # streaming: the first chunk of this choice was sent


class ChoiceRenderer:
    """Shared by completions and chat: per-choice state, usage, the response envelope.

    ``tokenizer`` is needed only when logprobs were asked for; ``echo`` (completions) is
    prepended to each choice's first text: one text for every choice, or one per prompt of a
    batch, whose choices ``i * n .. i * n + n - 1`` are prompt ``i``'s (``n``: samples per prompt).
    """

    object_full = ""
    object_chunk = ""

    def __init__(self, response_id: str, model: str, *, logprobs: bool, include_usage: bool,
                 tokenizer: RouterTokenizer | None = None, echo: str | tuple[str, ...] = "",
                 n: int = 1) -> None:
        self.response_id = response_id
        self.model = model
        self.created = int(time.time())
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.tokenizer = tokenizer
        self._echo = echo
        self._n = n
        self.usage: gen_pb.Usage | None = None
        self._choices: dict[int, _Choice] = {}

    def _choice(self, index: int) -> _Choice:
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = _Choice(index, text_offset=len(self.echo(index)))
        return choice

    def echo(self, index: int) -> str:
        """The prompt text echoed before choice ``index`` ("" without echo)."""
        if isinstance(self._echo, str):  # one prompt: every choice
            return self._echo
        prompt = index // self._n
        return self._echo[prompt] if prompt < len(self._echo) else ""

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    # -- streaming -------------------------------------------------------------------------
    def event(self, chunk: gen_pb.GenerateResponse) -> list[bytes]:
        """The SSE events for one chunk: its choice delta, then the usage chunk when asked."""
        events = []
        if chunk.text or chunk.token_ids or chunk.finish_reason:
            choice = self._choice(chunk.index)
            first = not choice.started
            choice.started = True
            delta = self._stream_choice(choice, chunk, first)
            body = self._envelope(self.object_chunk, [delta])
            if self.include_usage:
                body["usage"] = None
            events.append(sse_event(body))
        if chunk.HasField("usage") and self.include_usage:
            body = self._envelope(self.object_chunk, [])
            body["usage"] = usage_json(chunk.usage)
            events.append(sse_event(body))
        return events

    def _stream_choice(self, choice: _Choice, chunk: gen_pb.GenerateResponse, first: bool) -> dict[str, Any]:
        raise NotImplementedError

    # -- whole response --------------------------------------------------------------------
    def add(self, chunk: gen_pb.GenerateResponse) -> None:
        """Collect one chunk for :meth:`full`."""
        choice = self._choice(chunk.index)
        choice.texts.append(chunk.text)
        choice.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason:
            choice.finish_reason = chunk.finish_reason
            choice.stop_reason = stop_reason(chunk)
        if chunk.HasField("usage"):
            self.usage = chunk.usage

    def full(self) -> dict[str, Any]:
        """The whole response, choices by index."""
        choices = [self._full_choice(c) for _, c in sorted(self._choices.items())]
        body = self._envelope(self.object_full, choices)
        body["usage"] = usage_json(self.usage if self.usage is not None else gen_pb.Usage())
        return body

    def _full_choice(self, choice: _Choice) -> dict[str, Any]:
        raise NotImplementedError

    # -- logprobs --------------------------------------------------------------------------
    def _token_texts(self, logprobs: Sequence[gen_pb.TokenLogprobs]) -> tuple[list[str], list[list[str]]]:
        """Texts of the chosen tokens and of each position's top alternatives."""
        assert self.tokenizer is not None, "logprobs need the model's tokenizer"
        ids = [lp.token_id for lp in logprobs]
        tops = [[t.token_id for t in lp.top] for lp in logprobs]
        texts = self.tokenizer.token_texts(ids + [t for top in tops for t in top])
        chosen, rest = texts[: len(ids)], texts[len(ids):]
        top_texts: list[list[str]] = []
        for top in tops:
            top_texts.append(rest[: len(top)])
            rest = rest[len(top):]
        return chosen, top_texts


class CompletionRenderer(ChoiceRenderer):
    """``/v1/completions``: ``text_completion`` objects, streamed or whole."""

    object_full = "text_completion"
    object_chunk = "text_completion"

    def _stream_choice(self, choice: _Choice, chunk: gen_pb.GenerateResponse, first: bool) -> dict[str, Any]:
        text = self.echo(chunk.index) + chunk.text if first else chunk.text
        return {
            "index": chunk.index,
            "text": text,
            "logprobs": self._logprobs(choice, chunk.logprobs) if self.logprobs else None,
            "finish_reason": chunk.finish_reason or None,
            "stop_reason": stop_reason(chunk) if chunk.finish_reason else None,
        }

    def _full_choice(self, choice: _Choice) -> dict[str, Any]:
        return {
            "index": choice.index,
            "text": self.echo(choice.index) + "".join(choice.texts),
            "logprobs": self._logprobs(choice, choice.logprobs) if self.logprobs else None,
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        }

    def _logprobs(self, choice: _Choice, logprobs: Sequence[gen_pb.TokenLogprobs]) -> dict[str, Any]:
        """OpenAI's completion logprobs: tokens, their logprobs, the top alternatives (the
        chosen token always among them) and each token's character offset in the text."""
        chosen, top_texts = self._token_texts(logprobs)
        offsets = []
        for text in chosen:
            offsets.append(choice.text_offset)
            choice.text_offset += len(text)
        tops = []
        for lp, token, alternatives in zip(logprobs, chosen, top_texts, strict=True):
            top = {text: alt.logprob for text, alt in zip(alternatives, lp.top, strict=True)}
            top.setdefault(token, lp.logprob)
            tops.append(top)
        return {"tokens": chosen, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": tops, "text_offset": offsets}


class ChatRenderer(ChoiceRenderer):
    """``/v1/chat/completions``: ``chat.completion`` / ``chat.completion.chunk`` objects."""

    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def _stream_choice(self, choice: _Choice, chunk: gen_pb.GenerateResponse, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": chunk.text}
        if first:
            delta = {"role": "assistant", **delta}
        return {
            "index": chunk.index,
            "delta": delta,
            "logprobs": {"content": self._logprobs(chunk.logprobs)} if self.logprobs else None,
            "finish_reason": chunk.finish_reason or None,
            "stop_reason": stop_reason(chunk) if chunk.finish_reason else None,
        }

    def _full_choice(self, choice: _Choice) -> dict[str, Any]:
        return {
            "index": choice.index,
            "message": {"role": "assistant", "content": "".join(choice.texts)},
            "logprobs": {"content": self._logprobs(choice.logprobs)} if self.logprobs else None,
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        }

    def _logprobs(self, logprobs: Sequence[gen_pb.TokenLogprobs]) -> list[dict[str, Any]]:
        """OpenAI's chat logprobs: per token its text, logprob, UTF-8 bytes and top alternatives."""
        chosen, top_texts = self._token_texts(logprobs)
        return [
            {
                "token": token,
                "logprob": lp.logprob,
                "bytes": list(token.encode()),
                "top_logprobs": [{"token": text, "logprob": alt.logprob, "bytes": list(text.encode())}
                                 for text, alt in zip(alternatives, lp.top, strict=True)],
            }
            for lp, token, alternatives in zip(logprobs, chosen, top_texts, strict=True)
        ]
