"""Turns a user prompt and its sampling parameters into validated engine-core requests.

Everything that can be wrong with a request is found here, before the engine core sees
it, and reported as a ``ValueError`` whose message starts with the offending field (the one
the client sent: ``messages`` for a chat). Requests over the context are
:class:`~llmserve.limits.LimitExceeded` (a ``ValueError``): a prompt of ``max_model_len``
tokens or more (limit ``max_model_len``), or ``prompt + max_tokens > max_model_len`` (limit
``max_tokens``): refused, not clamped, as vLLM does, so a client never gets fewer tokens than
it asked for without being told.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpu_worker.core.types import EngineCoreRequest, ImageInput
from gpu_worker.engine.feature_checks import FeatureChecks
from gpu_worker.engine.image_inputs import ImageInputs
from gpu_worker.sampling_params import SamplingParams
from llmserve.limits import LimitExceeded, flag_of
from llmserve.prompt_input import (
    ChatPrompt,
    PromptInput,
    check_prompt_input,
    check_template_kwargs,
    input_field,
    template_messages,
    truncate_prompt,
)

# A pooling engine's requests: the one token its last prefill step "samples" ends them.
POOLING_PARAMS = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
NO_TOKENIZER = "this model has no tokenizer"


@dataclass(frozen=True)
class ProcessedRequest:
    """A request ready for the core: one ``EngineCoreRequest`` per sample (``n`` of them)."""

    request_id: str
    prompt: str | None  # the prompt text (rendered template for chat), None for token ids
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    core_requests: tuple[EngineCoreRequest, ...]
    resumed_token_ids: tuple[int, ...] = ()  # outputs generated elsewhere before (a resumed stream)

    @property
    def child_ids(self) -> list[str]:
        return [r.request_id for r in self.core_requests]


def child_request_id(request_id: str, index: int, n: int) -> str:
    """Core request id of sample ``index`` of a request with ``n`` samples."""
    return request_id if n == 1 else f"{request_id}#{index}"


class InputProcessor:
    """Tokenizes and validates prompts for one model.

    ``vocab_size`` is the model's (embedding rows), ``max_model_len`` the context length
    the engine serves (already capped to the KV pool). With ``tokenizer=None`` (a model served
    without one) only token-id prompts without stop strings are accepted. ``pooling``: the engine
    embeds (``runner`` "pooling"): every request becomes one greedy token (:data:`POOLING_PARAMS`),
    whose step returns the embedding. ``images``: the model's image preprocessing (None: a model
    that takes no images, which refuses them).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int, eos_token_ids: frozenset[int],
                 pooling: bool = False, lora_names: frozenset[str] = frozenset(),
                 images: ImageInputs | None = None):
        self.pooling = pooling
        self.images = images
        self.lora_names = lora_names  # the LoRA adapters the engine serves
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.features = FeatureChecks(tokenizer)  # structured output, plug-ins

    def render_chat(self, prompt: ChatPrompt) -> str:
        """The prompt text of a (checked) conversation, through the tokenizer's chat template."""
        self._require_tokenizer("messages")
        check_template_kwargs(prompt.template_kwargs, self.tokenizer.apply_chat_template)
        text = self.tokenizer.apply_chat_template(
            template_messages(prompt), add_generation_prompt=prompt.add_generation_prompt,
            continue_final_message=prompt.continue_final_message, tokenize=False,
            tools=[dict(t) for t in prompt.tools] if prompt.tools else None,
            **dict(prompt.template_kwargs or {}),
        )
        return str(text)

    def tokenize(self, prompt: PromptInput) -> tuple[str | None, tuple[int, ...]]:
        """(prompt text or None, prompt token ids), without length or vocabulary checks."""
        check_prompt_input(prompt)
        if isinstance(prompt, ChatPrompt):
            text = self.render_chat(prompt)
            # The template already holds the special tokens (BOS) the model expects.
            return text, tuple(self.tokenizer.encode(text, add_special_tokens=False))
        if isinstance(prompt, str):
            self._require_tokenizer("prompt")
            return prompt, tuple(self.tokenizer.encode(prompt))
        return None, tuple(int(t) for t in prompt)

    def process(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        resumed_token_ids: Sequence[int] = (),
        core_tag: str = "",
        lora_name: str = "",
        images: Sequence[Any] = (),
    ) -> ProcessedRequest:
        """Validate and tokenize; fan ``n > 1`` out into ``n`` core requests.

        Child ``i`` of a seeded request samples with ``seed + i`` so that the samples
        differ yet the whole request stays reproducible. ``resumed_token_ids``: outputs another
        worker generated before it failed (``n == 1`` only); the request continues after them
        exactly as if it had generated them (they count toward ``max_tokens``). ``core_tag`` is
        appended to the core request ids: a serving front makes them unique per submission, so
        outputs still in flight for an earlier request of the same id never reach this one.
        ``lora_name``: the LoRA adapter to run with ("": the base model); one the engine does not
        serve is refused. ``images``: the prompt's images (encoded files or ``PIL.Image``s), one
        per image token of the prompt, in order (:mod:`gpu_worker.engine.image_inputs`).
        """
        if not request_id:
            raise ValueError("request_id must not be empty")
        if lora_name and lora_name not in self.lora_names:
            raise ValueError(f"LoRA adapter {lora_name[:64]!r} is not served here; served: "
                             f"{sorted(self.lora_names)}")
        params = params if params is not None else SamplingParams()
        if self.pooling:  # what to generate is not the caller's to say: one prefill, one vector
            params = dataclasses.replace(POOLING_PARAMS, truncate_prompt_tokens=params.truncate_prompt_tokens)
        params.validate(self.vocab_size)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop: {NO_TOKENIZER}; stop strings cannot be matched (use stop_token_ids)")
        self.features.check(params)
        if params.bad_words:
            params = self._with_bad_word_ids(params)
        text, ids = self.tokenize(prompt)
        field = input_field(prompt)
        image_inputs: tuple[ImageInput, ...] = ()
        if self.images is not None:  # a prompt's image tokens need their images, and back
            if images and params.truncate_prompt_tokens is not None:
                raise ValueError("truncate_prompt_tokens cannot be used with images (it could cut an image)")
            ids, image_inputs = self.images.prepare(ids, images, field)
        elif images:
            raise ValueError("images: this model takes no images")
        ids = tuple(truncate_prompt(ids, params.truncate_prompt_tokens, self.max_model_len))
        self.check_prompt_token_ids(ids, field=field)
        resumed = tuple(int(t) for t in resumed_token_ids)
        self._check_resumed(resumed, params)
        if resumed and params.prompt_logprobs is not None:
            # The worker that started the stream sent them (a router resumes only a stream whose
            # prompt logprobs all went out).
            params = dataclasses.replace(params, prompt_logprobs=None)
        self._check_max_tokens(len(ids), params, field)  # max_tokens counts resumed tokens too
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            child_params = dataclasses.replace(params, n=1, seed=seed) if params.n > 1 else params
            if i and params.prompt_logprobs is not None:  # the request's, not each sample's: one computes
                child_params = dataclasses.replace(child_params, prompt_logprobs=None)
            children.append(
                EngineCoreRequest(
                    request_id=child_request_id(request_id + core_tag, i, params.n),
                    prompt_token_ids=ids,
                    params=child_params,
                    eos_token_ids=self.eos_token_ids,
                    arrival_time=arrival,
                    priority=priority,
                    output_token_ids=resumed,
                    lora_name=lora_name,
                    images=image_inputs,
                )
            )
        return ProcessedRequest(request_id, text, ids, params, tuple(children), resumed)

    def _with_bad_word_ids(self, params: SamplingParams) -> SamplingParams:
        """``params`` with each bad word's token sequences added to ``bad_words_token_ids``: the
        word alone (at the start of the output) and after a space (mid-text), when that is another
        sequence. vLLM adds the second only when it has as many tokens, which lets a word whose
        spaced form is one token (" cabinets", where "cabinets" is two) through mid-text."""
        if self.tokenizer is None:
            raise ValueError(f"bad_words: {NO_TOKENIZER}; give bad_words_token_ids instead")
        sequences = list(params.bad_words_token_ids)
        for word in params.bad_words:
            alone = tuple(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            sequences.append(alone)
            if spaced and spaced != alone:
                sequences.append(spaced)
        out = dataclasses.replace(params, bad_words_token_ids=tuple(dict.fromkeys(sequences)))
        out.validate(self.vocab_size)
        return out

    def _check_max_tokens(self, num_tokens: int, params: SamplingParams, field: str) -> None:
        """``prompt + max_tokens`` must fit the context (vLLM refuses such requests too)."""
        max_tokens = params.max_tokens
        if max_tokens is not None and num_tokens + max_tokens > self.max_model_len:
            raise LimitExceeded(
                "max_tokens",
                f"max_tokens is too large: {max_tokens}; the {field} has {num_tokens} tokens and the "
                f"model's context (max_model_len, flag {flag_of('max_model_len')}) is {self.max_model_len} "
                f"tokens, so at most {self.max_model_len - num_tokens} tokens can be generated",
            )

    def _check_resumed(self, resumed: tuple[int, ...], params: SamplingParams) -> None:
        if not resumed:
            return
        if params.n != 1:
            raise ValueError(f"resume needs n = 1, got n = {params.n}")
        if params.max_tokens is not None and len(resumed) >= params.max_tokens:
            raise ValueError(
                f"resume.output_token_ids has {len(resumed)} tokens: max_tokens ({params.max_tokens}) "
                "leaves nothing to generate"
            )
        bad = [t for t in resumed if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                "resume.output_token_ids has token ids outside the vocabulary "
                f"[0, {self.vocab_size}): {bad[:5]}"
            )

    def _require_tokenizer(self, field: str) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{field}: {NO_TOKENIZER}: send prompt_token_ids")

    def check_prompt_token_ids(self, ids: Sequence[int], field: str) -> None:
        """Raise ``ValueError`` naming ``field`` for tokenized ids that are none, too many for
        the context or outside the vocabulary (empty inputs are refused before tokenizing)."""
        if not ids:
            raise ValueError(f"{field} produced no tokens")
        if len(ids) >= self.max_model_len:
            raise LimitExceeded(
                "max_model_len",
                f"{field} is too long: {len(ids)} tokens; the model's context (max_model_len, flag "
                f"{flag_of('max_model_len')}) is {self.max_model_len} tokens, which must leave room for "
                "at least one output token",
            )
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"{field} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
            )
