"""vLLM's tokenizer endpoints at the router's OpenAI door: ``POST /tokenize`` and ``/detokenize``.

The bodies and replies are vLLM's: ``/tokenize`` takes ``prompt`` (special tokens added unless
``add_special_tokens`` is false) or ``messages`` (rendered with the chat template;
``add_generation_prompt``, default true; ``add_special_tokens``, default false) and returns
``{"count", "max_model_len", "tokens", "token_strs"}`` (``token_strs``: the vocabulary's
strings, when ``return_token_strs``); ``/detokenize`` takes ``tokens`` and returns
``{"prompt"}``. The ids are exactly those a generation of the same input is served with:
the router's tokenizer of the model is the one it routes with (``router/tokenizers.py``), and
the worker tokenizes the same way.

Each call passes what a generation passes before it costs anything: the model resolved to its
live workers, the prompt's characters and chat turns within the request limits, the API key
allowed the model and charged one request of its budget (no tokens: nothing is generated).
A ``/detokenize`` list longer than the model's context (``max_model_len``) is refused, as is an
id outside the vocabulary. Tokenizing runs in a thread, as for a generation.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llmserve.prompt_input import ChatPrompt, PromptInput
from llmserve.v1 import generation_pb2 as gen_pb
from router.frontends.openai_errors import InvalidParam
from router.frontends.openai_schemas import ChatMessageIn, chat_prompt, validate
from router.generation import GenerationCore
from router.images import expand_images
from router.tokenizers import RouterTokenizer

TOKENIZE_ROUTE = "/tokenize"
DETOKENIZE_ROUTE = "/detokenize"


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: one of ``prompt`` and ``messages``."""

    model_config = ConfigDict(extra="ignore")
    model: str = ""
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None  # None: True for a prompt, False for messages (vLLM's)
    return_token_strs: bool = False
    tools: list[Any] | None = None  # as a chat's: shown to the template
    chat_template_kwargs: dict[str, Any] | None = None

    def prompt_input(self) -> str | ChatPrompt:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidParam("prompt", "send exactly one of prompt and messages")
        if self.messages is None:
            if not self.prompt:
                raise InvalidParam("prompt", "prompt must not be empty")
            return self.prompt
        return chat_prompt(self.messages, self.add_generation_prompt, self.continue_final_message,
                           tools=self.tools or None, template_kwargs=self.chat_template_kwargs)


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``."""

    model_config = ConfigDict(extra="ignore")
    model: str = ""
    tokens: list[int]


@dataclass(frozen=True)
class TokenizerEndpoints:
    """The two endpoints over a :class:`GenerationCore` (its router, limits and access control)."""

    core: GenerationCore

    async def tokenize(self, data: dict[str, Any], request_id: str) -> dict[str, Any]:
        """The reply of ``/tokenize``; a ``RouterError`` (an ``InvalidParam`` included) otherwise."""
        parsed = validate(TokenizeRequest, data)
        prompt = parsed.prompt_input()
        tok, context = await self._tokenizer(parsed.model, request_id, prompt)
        ids = await asyncio.to_thread(tok.encode, prompt, parsed.add_special_tokens)
        num_images = sum(m.num_images for m in parsed.messages or ())
        if num_images:  # counted as the workers run them: each image token its run
            ids = expand_images(parsed.model, tok.image_tokens, ids, num_images, "messages", None)
        strs = await asyncio.to_thread(tok.token_strs, ids) if parsed.return_token_strs else None
        return {"count": len(ids), "max_model_len": context, "tokens": ids, "token_strs": strs}

    async def detokenize(self, data: dict[str, Any], request_id: str) -> dict[str, Any]:
        """The reply of ``/detokenize``; a ``RouterError`` otherwise."""
        parsed = validate(DetokenizeRequest, data)
        tok, context = await self._tokenizer(parsed.model, request_id, None)
        tokens = parsed.tokens
        if len(tokens) > context:
            raise InvalidParam("tokens", f"tokens is too long: {len(tokens)} tokens; the model's context "
                               f"(max_model_len) is {context} tokens")
        vocab = tok.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidParam("tokens", f"tokens must be ids in the vocabulary [0, {vocab}), got {bad}")
        return {"prompt": await asyncio.to_thread(tok.decode, tokens)}

    async def _tokenizer(self, model: str, request_id: str, prompt: PromptInput | None
                         ) -> tuple[RouterTokenizer, int]:
        """The model's tokenizer and smallest context, once the call passed what a generation
        passes before it costs anything."""
        router = self.core.router
        name, workers = await router.resolve(model)
        if prompt is not None:
            router.admit(request_id, prompt, gen_pb.SamplingParams())
        self.core.access.admit(name)
        tok = await router.tokenizers.get(name, workers)
        return tok, min(w.max_model_len for w in workers)
