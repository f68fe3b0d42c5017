"""Per-model tokenizers at the router, fetched from a worker and cached.

A worker sends its tokenizer as files (``WorkerControl.GetTokenizer``); the router writes them
to a temporary folder and loads them with ``AutoTokenizer`` (transformers imports without
torch). Tokenization mirrors the worker's ``InputProcessor`` exactly: a plain prompt is
``encode(text)`` (special tokens added as the tokenizer does by default); a chat is rendered
with the chat template as text, then encoded without adding special tokens (the template
holds them). ``tests/router/test_e2e.py`` proves the parity. A model served
without a tokenizer (``skip_tokenizer_init``) needs none here: token-id requests are routed
as they are, text and chat requests get INVALID_ARGUMENT (:class:`~router.errors.NoTokenizer`).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmserve.fleet import WorkerRecord
from llmserve.multimodal import IMAGE_TOKENS_FILE, ImageTokens
from llmserve.prompt_input import ChatPrompt, check_template_kwargs, template_messages
from router.errors import InvalidRequest, ModelUnavailable, NoTokenizer

log = logging.getLogger(__name__)

FetchTokenizer = Callable[[WorkerRecord], Awaitable[Mapping[str, bytes]]]


class RouterTokenizer:
    """One model's tokenizer, used from worker threads (the Rust tokenizer releases the GIL)."""

    def __init__(self, tokenizer: Any, image_tokens: ImageTokens | None = None) -> None:
        self._tok = tokenizer
        self._token_texts: dict[int, str] = {}
        self.image_tokens = image_tokens  # how the model marks an image (None: it takes none)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> RouterTokenizer:
        """Load from a tokenizer's files (names as ``save_pretrained`` writes them), and the
        model's image tokens from ``IMAGE_TOKENS_FILE`` when the worker sent one."""
        from transformers import AutoTokenizer

        image_tokens = None
        with tempfile.TemporaryDirectory(prefix="llmserve-router-tok-") as tmp:
            for name, content in files.items():
                if Path(name).name != name:
                    raise ValueError(f"bad tokenizer file name {name!r}")
                if name == IMAGE_TOKENS_FILE:
                    image_tokens = ImageTokens.from_json(content)
                    continue
                (Path(tmp) / name).write_bytes(content)
            return cls(AutoTokenizer.from_pretrained(tmp), image_tokens)

    @property
    def vocab_size(self) -> int:
        """Ids below this are the tokenizer's (added tokens included)."""
        return len(self._tok)

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a plain prompt, as the worker computes them (``add_special_tokens``
        False: without the BOS or other tokens the tokenizer adds, as vLLM's ``/tokenize``)."""
        if not text:
            raise InvalidRequest("prompt must not be empty")
        _check_unicode("prompt", text)
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def token_strs(self, token_ids: Sequence[int]) -> list[str]:
        """The vocabulary's string of each id (``"Ġworld"``, not the decoded ``" world"``)."""
        return [str(t) for t in self._tok.convert_ids_to_tokens(list(token_ids))]

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids`` (special tokens kept, as the worker's output text)."""
        return str(self._tok.decode(list(token_ids)))

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's text on its own, as logprobs show tokens (cached per id: a vocabulary
        is bounded, and the same tokens recur)."""
        cache = self._token_texts
        missing = sorted({t for t in token_ids if t not in cache})
        if missing:
            for token_id, text in zip(missing, self._tok.batch_decode([[t] for t in missing]), strict=True):
                cache[token_id] = str(text)
        return [cache[t] for t in token_ids]

    def encode(self, prompt: str | ChatPrompt, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of a text or chat prompt, as the worker computes them; ``add_special_tokens``
        None: the worker's way (added to a text, not to a chat, whose template holds them)."""
        if isinstance(prompt, ChatPrompt):
            return self.encode_chat(prompt, bool(add_special_tokens))
        return self.encode_prompt(prompt, add_special_tokens is not False)

    def encode_chat(self, chat: ChatPrompt, add_special_tokens: bool = False) -> list[int]:
        """Token ids of a chat rendered with the model's template, as the worker computes them
        (the template holds the special tokens; ``add_special_tokens`` adds the tokenizer's too)."""
        messages = chat.messages
        if not messages:
            raise InvalidRequest("messages must not be empty")
        for i, message in enumerate(messages):
            for key, value in message.items():
                if isinstance(value, str):
                    _check_unicode(f"messages[{i}].{key}", value)
        try:
            check_template_kwargs(chat.template_kwargs, self._tok.apply_chat_template)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        try:
            text = self._tok.apply_chat_template(
                template_messages(chat), add_generation_prompt=chat.add_generation_prompt,
                continue_final_message=chat.continue_final_message, tokenize=False,
                tools=[dict(t) for t in chat.tools] if chat.tools else None,
                **dict(chat.template_kwargs or {}),
            )
        except Exception as exc:  # template errors (bad roles, no template) are the client's
            raise InvalidRequest(f"messages could not be rendered with the chat template: {exc}") from exc
        _check_unicode("messages", str(text))  # tools and tool calls: strings nested in JSON
        return list(self._tok.encode(str(text), add_special_tokens=add_special_tokens))


def _check_unicode(field: str, text: str) -> None:
    """InvalidRequest naming ``field`` when ``text`` holds a lone UTF-16 surrogate (JSON's
    ``"\\ud800"``): no tokenizer takes one (it is no Unicode character)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{field} is not valid Unicode: a lone surrogate at character {exc.start}"
                             ) from None


class TokenizerCache:
    """Model name -> :class:`RouterTokenizer`, loaded once per model (single flight)."""

    def __init__(self, fetch: FetchTokenizer) -> None:
        self._fetch = fetch
        self._loaded: dict[str, RouterTokenizer] = {}
        self._pending: dict[str, asyncio.Future[RouterTokenizer]] = {}

    def cached(self, model: str) -> RouterTokenizer | None:
        return self._loaded.get(model)

    async def get(self, model: str, workers: Sequence[WorkerRecord]) -> RouterTokenizer:
        """The tokenizer of ``model``, fetched from the first of ``workers`` that answers."""
        tok = self._loaded.get(model)
        if tok is not None:
            return tok
        pending = self._pending.get(model)
        if pending is None:
            pending = asyncio.ensure_future(self._load(model, list(workers)))
            self._pending[model] = pending
            pending.add_done_callback(lambda _f: self._pending.pop(model, None))
        return await asyncio.shield(pending)

    async def _load(self, model: str, workers: list[WorkerRecord]) -> RouterTokenizer:
        errors: list[str] = []
        for worker in workers:
            try:
                files = await self._fetch(worker)
            except NoTokenizer:
                raise  # the client's to fix (send token ids); not cached, as workers may change
            except Exception as exc:  # noqa: BLE001 - try the next worker
                errors.append(f"{worker.worker_id}: {exc}")
                continue
            tok = await asyncio.to_thread(RouterTokenizer.from_files, files)
            self._loaded[model] = tok
            log.info("loaded the tokenizer of %s from worker %s", model, worker.worker_id)
            return tok
        raise ModelUnavailable(model, f"no worker sent its tokenizer ({'; '.join(errors) or 'no workers'})")
