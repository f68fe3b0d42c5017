"""The worker's chunks of one request, shaped as OpenAI responses.

A renderer follows one request: :meth:`ChoiceRenderer.event` turns each ``GenerateResponse``
chunk into the objects of a streamed response (``text_completion`` / ``chat.completion.chunk``),
:meth:`ChoiceRenderer.add` collects chunks for a whole response (:meth:`ChoiceRenderer.full`).
Token texts in logprobs are decoded with the model's tokenizer at the router. ``usage`` carries
``prompt_tokens_details.cached_tokens`` (prompt tokens found in the worker's prefix cache).

The prompt's logprobs (``GenerateResponse.prompt_logprobs``, in chunks before the first token) are
collected per prompt and shown two ways: vLLM's ``prompt_logprobs`` (a list, the first entry
null, then per position the prompt token and the alternatives by token id: a completions choice's
or a chat response's key) and, for completions with ``echo`` and ``logprobs``, as the leading
entries of each choice's ``logprobs`` (the prompt's tokens, the first with null logprobs, as
OpenAI and vLLM show them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmserve.stop_reason import stop_reason
from llmserve.v1 import generation_pb2 as gen_pb
from router.frontends.reasoning import ReasoningStream
from router.frontends.tool_calls import ToolCallStream, ToolChoice
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


def _vllm_logprob(logprob: float, rank: int, decoded_token: str) -> dict[str, Any]:
    return {"logprob": logprob, "rank": rank, "decoded_token": decoded_token}


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
    num_tokens: int = 0  # tokens generated so far


@dataclass
class _PromptLogprobs:
    """One prompt's logprobs so far: its first token (which has none) and, from its second token
    on, one entry per position, in order."""

    first_token_id: int | None = None
    positions: list[gen_pb.TokenLogprobs] = field(default_factory=list)
    num_tokens: int = 0  # the prompt's tokens (continuous usage)


class ChoiceRenderer:
    """Shared by completions and chat: per-choice state, usage, the response envelope.

    ``tokenizer`` is needed only when logprobs were asked for; ``echo`` (completions) is
    prepended to each choice's first text: one text for every choice, or one per prompt of a
    batch, whose choices ``i * n .. i * n + n - 1`` are prompt ``i``'s (``n``: samples per prompt).
    ``prompt_logprobs``: vLLM's extra, shown with that many alternatives per position (whole
    responses only); the door gives each prompt's token ids (:meth:`prompt_token_ids`).
    """

    object_full = ""
    object_chunk = ""

    def __init__(self, response_id: str, model: str, *, logprobs: bool, include_usage: bool,
                 tokenizer: RouterTokenizer | None = None, echo: str | tuple[str, ...] = "",
                 n: int = 1, prompt_logprobs: int | None = None, continuous_usage: bool = False) -> None:
        self.response_id = response_id
        self.model = model
        self.created = int(time.time())
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.tokenizer = tokenizer
        self.prompt_logprobs = prompt_logprobs
        self.continuous_usage = continuous_usage
        self._echo = echo
        self._n = n
        self.usage: gen_pb.Usage | None = None
        self._choices: dict[int, _Choice] = {}
        self._prompts: dict[int, _PromptLogprobs] = {}  # by prompt (a batch's), choices i * n ..

    def _choice(self, index: int) -> _Choice:
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = _Choice(index, text_offset=self._first_offset(index))
        return choice

    def _first_offset(self, index: int) -> int:
        """Character offset of choice ``index``'s first generated token: after the echo."""
        return len(self.echo(index))

    def _prompt(self, prompt: int) -> _PromptLogprobs:
        part = self._prompts.get(prompt)
        if part is None:
            part = self._prompts[prompt] = _PromptLogprobs()
        return part

    def prompt_token_ids(self, prompt: int, token_ids: Sequence[int]) -> None:
        """Prompt ``prompt``'s token ids as its workers got them (tokenized, truncated): its first
        token leads its prompt logprobs with none of its own, so no chunk names it."""
        part = self._prompt(prompt)
        if part.first_token_id is None and token_ids:
            part.first_token_id = token_ids[0]
        part.num_tokens = len(token_ids)

    def _collect_prompt_logprobs(self, chunk: gen_pb.GenerateResponse) -> bool:
        """Keep the prompt logprobs ``chunk`` carries (True when it does)."""
        if not chunk.prompt_logprobs:
            return False
        self._prompt(chunk.index // self._n).positions.extend(chunk.prompt_logprobs)
        return True

    def _usage_json(self, usage: gen_pb.Usage) -> dict[str, Any]:
        return usage_json(usage)

    def _choice_usage(self, choice: _Choice) -> dict[str, int]:
        """vLLM's continuous usage: the choice's prompt and its tokens so far."""
        prompt = self._prompt(choice.index // self._n).num_tokens
        completion = self._shown_tokens(choice.num_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _shown_tokens(self, generated: int) -> int:
        """Completion tokens the response counts of ``generated``."""
        return generated

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
        return [sse_event(body) for body in self.event_objects(chunk)]

    def event_objects(self, chunk: gen_pb.GenerateResponse) -> list[dict[str, Any]]:
        """The streamed objects for one chunk (what :meth:`event` sends as SSE)."""
        events: list[dict[str, Any]] = []
        self._collect_prompt_logprobs(chunk)
        if chunk.text or chunk.token_ids or chunk.finish_reason:
            choice = self._choice(chunk.index)
            first = not choice.started
            choice.started = True
            choice.num_tokens += len(chunk.token_ids)
            delta = self._stream_choice(choice, chunk, first)
            body = self._envelope(self.object_chunk, [delta])
            if self.include_usage:
                body["usage"] = self._choice_usage(choice) if self.continuous_usage else None
            events.append(body)
        if chunk.HasField("usage") and self.include_usage:
            body = self._envelope(self.object_chunk, [])
            body["usage"] = self._usage_json(chunk.usage)
            events.append(body)
        return events

    def _stream_choice(self, choice: _Choice, chunk: gen_pb.GenerateResponse, first: bool) -> dict[str, Any]:
        raise NotImplementedError

    # -- whole response --------------------------------------------------------------------
    def add(self, chunk: gen_pb.GenerateResponse) -> None:
        """Collect one chunk for :meth:`full`."""
        if self._collect_prompt_logprobs(chunk):
            return  # such a chunk carries nothing else
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
        body["usage"] = self._usage_json(self.usage if self.usage is not None else gen_pb.Usage())
        return body

    def _full_choice(self, choice: _Choice) -> dict[str, Any]:
        raise NotImplementedError

    # -- logprobs --------------------------------------------------------------------------
    def _token_texts(self, logprobs: Sequence[gen_pb.TokenLogprobs], top_n: int | None = None
                     ) -> tuple[list[str], list[list[str]]]:
        """Texts of the chosen tokens and of each position's top alternatives (the first
        ``top_n``: all when None)."""
        assert self.tokenizer is not None, "logprobs need the model's tokenizer"
        ids = [lp.token_id for lp in logprobs]
        tops = [[t.token_id for t in lp.top[:top_n]] for lp in logprobs]
        texts = self.tokenizer.token_texts(ids + [t for top in tops for t in top])
        chosen, rest = texts[: len(ids)], texts[len(ids):]
        top_texts: list[list[str]] = []
        for top in tops:
            top_texts.append(rest[: len(top)])
            rest = rest[len(top):]
        return chosen, top_texts

    def _vllm_prompt_logprobs(self, prompt: int) -> list[dict[str, Any] | None]:
        """vLLM's ``prompt_logprobs`` of prompt ``prompt``: null for its first token, then per
        position the prompt token and the top alternatives (ranks 1..N), by token id as text."""
        positions = self._prompts[prompt].positions if prompt in self._prompts else []
        top_n = self.prompt_logprobs
        chosen, top_texts = self._token_texts(positions, top_n)
        entries: list[dict[str, Any] | None] = [None]
        for lp, token, alternatives in zip(positions, chosen, top_texts, strict=True):
            entry = {str(lp.token_id): _vllm_logprob(lp.logprob, lp.rank, token)}
            for rank, (alt, text) in enumerate(zip(lp.top[:top_n], alternatives, strict=True), start=1):
                entry.setdefault(str(alt.token_id), _vllm_logprob(alt.logprob, rank, text))
            entries.append(entry)
        return entries


class CompletionRenderer(ChoiceRenderer):
    """``/v1/completions``: ``text_completion`` objects, streamed or whole.

    ``echo_logprobs`` (``echo`` with ``logprobs``: that N): each choice's logprobs start with its
    prompt's tokens, the first with null logprob and alternatives (its first streamed chunk has
    them), and text offsets count from the prompt's first token, as vLLM's. ``echo_only`` (vLLM's
    echo with ``max_tokens`` 0): the prompt is all a choice shows, finish_reason "length", no
    completion tokens in the usage (the worker generated one token, dropped here).
    """

    object_full = "text_completion"
    object_chunk = "text_completion"

    def __init__(self, response_id: str, model: str, *, echo_logprobs: int | None = None,
                 echo_only: bool = False, **kwargs: Any) -> None:
        super().__init__(response_id, model, **kwargs)
        self.echo_logprobs = echo_logprobs
        self.echo_only = echo_only

    def _first_offset(self, index: int) -> int:
        return 0 if self.echo_logprobs is not None else len(self.echo(index))

    def _shown_tokens(self, generated: int) -> int:
        return 0 if self.echo_only else generated

    def _usage_json(self, usage: gen_pb.Usage) -> dict[str, Any]:
        if not self.echo_only:
            return usage_json(usage)
        shown = gen_pb.Usage()
        shown.CopyFrom(usage)
        shown.completion_tokens = 0
        return usage_json(shown)

    def _stream_choice(self, choice: _Choice, chunk: gen_pb.GenerateResponse, first: bool) -> dict[str, Any]:
        generated = not self.echo_only
        text = (self.echo(chunk.index) if first else "") + (chunk.text if generated else "")
        return {
            "index": chunk.index,
            "text": text,
            "logprobs": self._logprobs(choice, chunk.logprobs if generated else (), with_prompt=first)
            if self.logprobs else None,
            "finish_reason": self._finish(chunk.finish_reason or None),
            "stop_reason": stop_reason(chunk) if chunk.finish_reason and generated else None,
        }

    def _full_choice(self, choice: _Choice) -> dict[str, Any]:
        generated = not self.echo_only
        body: dict[str, Any] = {
            "index": choice.index,
            "text": self.echo(choice.index) + ("".join(choice.texts) if generated else ""),
            "logprobs": self._logprobs(choice, choice.logprobs if generated else (), with_prompt=True)
            if self.logprobs else None,
            "finish_reason": self._finish(choice.finish_reason),
            "stop_reason": choice.stop_reason if generated else None,
        }
        if self.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._vllm_prompt_logprobs(choice.index // self._n)
        return body

    def _finish(self, reason: str | None) -> str | None:
        return "length" if reason and self.echo_only else reason

    def _logprobs(self, choice: _Choice, logprobs: Sequence[gen_pb.TokenLogprobs], with_prompt: bool
                  ) -> dict[str, Any]:
        """OpenAI's completion logprobs: tokens, their logprobs, the top alternatives (the
        chosen token always among them) and each token's character offset in the text; led by
        the prompt's (``with_prompt``, when echoed with logprobs)."""
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if with_prompt and self.echo_logprobs is not None:
            part = self._prompts.get(choice.index // self._n, _PromptLogprobs())
            if part.first_token_id is not None:
                assert self.tokenizer is not None, "logprobs need the model's tokenizer"
                tokens += self.tokenizer.token_texts([part.first_token_id])
                values.append(None)
                tops.append(None)
            self._add_entries(part.positions, self.echo_logprobs, tokens, values, tops)
        self._add_entries(logprobs, None, tokens, values, tops)
        offsets = []
        for text in tokens:
            offsets.append(choice.text_offset)
            choice.text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _add_entries(self, logprobs: Sequence[gen_pb.TokenLogprobs], top_n: int | None, tokens: list[str],
                     values: list[float | None], tops: list[dict[str, float] | None]) -> None:
        chosen, top_texts = self._token_texts(logprobs, top_n)
        for lp, token, alternatives in zip(logprobs, chosen, top_texts, strict=True):
            top = {text: alt.logprob for text, alt in zip(alternatives, lp.top[:top_n], strict=True)}
            top.setdefault(token, lp.logprob)
            tokens.append(token)
            values.append(lp.logprob)
            tops.append(top)


class ChatRenderer(ChoiceRenderer):
    """``/v1/chat/completions``: ``chat.completion`` / ``chat.completion.chunk`` objects.

    ``reasoning_parser`` (the model's): each choice's reasoning goes to ``reasoning_content``
    (router/frontends/reasoning.py; dropped without ``include_reasoning``), its answer on.
    ``tool_choice`` (a request with tools): the answer becomes the message's ``content`` and
    ``tool_calls`` (router/frontends/tool_calls.py); a reply of calls ends with finish reason
    ``tool_calls`` unless a named function was asked for (vLLM's rule)."""

    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def __init__(self, response_id: str, model: str, *, tool_choice: ToolChoice | None = None,
                 reasoning_parser: str | None = None, include_reasoning: bool = True, **kwargs: Any) -> None:
        super().__init__(response_id, model, **kwargs)
        self.tool_choice = tool_choice if tool_choice is not None and tool_choice.kind != "none" else None
        self.reasoning_parser = reasoning_parser
        self.include_reasoning = include_reasoning
        self._tool_streams: dict[int, ToolCallStream] = {}
        self._reasoning_streams: dict[int, ReasoningStream] = {}

    def _reasoning_stream(self, index: int) -> ReasoningStream | None:
        if self.reasoning_parser is None:
            return None
        stream = self._reasoning_streams.get(index)
        if stream is None:
            stream = self._reasoning_streams[index] = ReasoningStream(self.reasoning_parser)
        return stream

    def _answer(self, index: int, text: str, finished: bool) -> tuple[str, str]:
        """(reasoning, answer) of a choice's new ``text`` (``finished``: its last)."""
        stream = self._reasoning_stream(index)
        if stream is None:
            return "", text
        split = stream.feed(text)
        reasoning, answer = split.reasoning, split.content
        if finished:
            last = stream.finish()
            reasoning, answer = reasoning + last.reasoning, answer + last.content
        return (reasoning if self.include_reasoning else ""), answer

    def _tool_stream(self, index: int) -> ToolCallStream | None:
        if self.tool_choice is None:
            return None
        stream = self._tool_streams.get(index)
        if stream is None:
            stream = self._tool_streams[index] = ToolCallStream(self.tool_choice)
        return stream

    def _finish_reason(self, stream: ToolCallStream | None, reason: str | None) -> str | None:
        if reason and stream is not None and stream.called and stream.choice.kind != "named":
            return "tool_calls"
        return reason

    def _stream_choice(self, choice: _Choice, chunk: gen_pb.GenerateResponse, first: bool) -> dict[str, Any]:
        reasoning, text = self._answer(chunk.index, chunk.text, bool(chunk.finish_reason))
        stream = self._tool_stream(chunk.index)
        if stream is None:
            delta: dict[str, Any] = {"content": text} if text or not reasoning else {}
        else:
            delta = stream.feed(text) if text else {}
            if chunk.finish_reason:
                delta = _merged_delta(delta, stream.finish())
        if reasoning:
            delta = {"reasoning_content": reasoning, **delta}
        if first:
            delta = {"role": "assistant", **delta}
        return {
            "index": chunk.index,
            "delta": delta,
            "logprobs": {"content": self._logprobs(chunk.logprobs)} if self.logprobs else None,
            "finish_reason": self._finish_reason(stream, chunk.finish_reason or None),
            "stop_reason": stop_reason(chunk) if chunk.finish_reason else None,
        }

    def full(self) -> dict[str, Any]:
        """The whole response; vLLM's ``prompt_logprobs`` at its top level when asked for."""
        body = super().full()
        if self.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._vllm_prompt_logprobs(0)
        return body

    def _full_choice(self, choice: _Choice) -> dict[str, Any]:
        reasoning, text = self._answer(choice.index, "".join(choice.texts), finished=True)
        stream = self._tool_stream(choice.index)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if stream is not None:
            stream.feed(text)
            stream.finish()
            message = stream.message()
        if self.reasoning_parser is not None:  # vLLM's field: null when the reply had none
            message = {**message, "reasoning_content": reasoning or None}
        return {
            "index": choice.index,
            "message": message,
            "logprobs": {"content": self._logprobs(choice.logprobs)} if self.logprobs else None,
            "finish_reason": self._finish_reason(stream, choice.finish_reason),
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


def _merged_delta(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two chat deltas of one chunk as one: contents joined, tool calls in order."""
    out = dict(first)
    if "content" in second:
        out["content"] = out.get("content", "") + second["content"]
    if "tool_calls" in second:
        out["tool_calls"] = [*out.get("tool_calls", []), *second["tool_calls"]]
    return out
