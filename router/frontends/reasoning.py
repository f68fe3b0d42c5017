"""Reasoning at the OpenAI door: a thinking model's ``<think>...</think>`` apart from its answer, as
vLLM's ``--reasoning-parser`` serves it (the message's ``reasoning_content``, DeepSeek's field).

* ``qwen3``: reasoning is the text of a ``<think>...</think>`` at the start of the reply; a reply
  without ``</think>`` is all content (Qwen3 with ``enable_thinking`` false writes none).
* ``deepseek_r1``: the template opens ``<think>`` in the prompt, so the reply starts inside the
  reasoning: everything up to ``</think>`` is reasoning (an opening ``<think>`` the model writes
  anyway is dropped), and a reply cut before ``</think>`` is all reasoning.

:class:`ReasoningStream` splits one choice's text, whole or streamed: while the end tag may still
come, text that could be its start is held back, so no delta ever carries part of a tag.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.frontends.tool_calls import MAX_LEADING_SPACE, held_prefix

REASONING_PARSERS = ("qwen3", "deepseek_r1")
_OPEN, _CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningSplit:
    """A piece of a reply: the reasoning and the answer (content) it holds."""

    reasoning: str = ""
    content: str = ""


class ReasoningStream:
    """Splits a reply into reasoning and content as its text arrives (:meth:`feed`, then
    :meth:`finish`); :attr:`reasoning` and :attr:`content` hold everything split so far. Once
    reasoning has started, a reply cut before ``</think>`` stays reasoning, streamed or whole."""

    def __init__(self, parser: str) -> None:
        if parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r}; known: {', '.join(REASONING_PARSERS)}")
        self.parser = parser
        self._rest = ""  # the text not split yet (held back: it may be part of a tag)
        self._state = "start"  # -> "thinking" -> "answer" (qwen3 without <think>: straight to "answer")
        # What was split, joined only when read (a string grown per chunk costs quadratic time).
        self._reasoning: list[str] = []
        self._content: list[str] = []

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        return "".join(self._content)

    def feed(self, chunk: str) -> ReasoningSplit:
        self._rest += chunk
        return self._split(final=False)

    def finish(self) -> ReasoningSplit:
        return self._split(final=True)

    def _split(self, final: bool) -> ReasoningSplit:
        reasoning, content = "", ""
        while True:
            rest = self._rest
            if self._state == "start":  # an opening <think> (after whitespace) is dropped
                stripped = rest.lstrip()
                if stripped.startswith(_OPEN):
                    self._rest = stripped[len(_OPEN):]
                    self._state = "thinking"
                    continue
                if not final and _OPEN.startswith(stripped) and len(rest) <= MAX_LEADING_SPACE:
                    break  # nothing yet, or maybe the start of <think>: wait
                self._state = "thinking" if self.parser == "deepseek_r1" else "answer"
                continue
            if self._state == "thinking":
                end = rest.find(_CLOSE)
                if end >= 0:
                    reasoning += rest[:end]
                    self._rest = rest[end + len(_CLOSE):]
                    self._state = "answer"
                    continue
                keep = 0 if final else held_prefix(rest, _CLOSE)
                reasoning += rest[:len(rest) - keep]
                self._rest = rest[len(rest) - keep:]
                break
            content += rest  # the answer
            self._rest = ""
            break
        self._reasoning.append(reasoning)
        self._content.append(content)
        return ReasoningSplit(reasoning, content)
