"""The offline API, as vLLM users know it: ``LLM(model=...).generate(prompts, params)``."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from gpu_worker.beam_search import (
    BeamSearch,
    BeamSearchOutput,
    BeamSearchParams,
    candidates_of,
    resolve_max_tokens,
)
from gpu_worker.config import EngineConfig
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.output_processor import OutputKind
from gpu_worker.engine.processor import ProcessedRequest
from gpu_worker.lora.request import LoraChoice, lora_names
from gpu_worker.outputs import RequestOutput
from gpu_worker.sampling_params import SamplingParams
from llmserve.gc_tuning import objects_frozen
from llmserve.multimodal import decode_data_url
from llmserve.prompt_input import ChatPrompt, PromptInput

Conversation = Sequence[dict[str, str]]
# A text, token ids, or vLLM's dict prompt ({"prompt" | "prompt_token_ids", "multi_modal_data"}).
OfflinePrompt = str | Sequence[int] | Mapping[str, Any]
_PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids", "multi_modal_data"})


def _offline_prompt(prompt: Any) -> tuple[PromptInput, tuple[Any, ...]]:
    """(the prompt, its images) of one :data:`OfflinePrompt`; ``ValueError`` naming the key."""
    if not isinstance(prompt, Mapping):
        return prompt, ()
    unknown = set(prompt) - _PROMPT_KEYS
    if unknown:
        raise ValueError(f"prompt dict: unknown keys {sorted(unknown)}; known: {sorted(_PROMPT_KEYS)}")
    if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise ValueError("prompt dict: give exactly one of prompt and prompt_token_ids")
    text_or_ids: PromptInput = prompt["prompt"] if "prompt" in prompt else list(prompt["prompt_token_ids"])
    data = prompt.get("multi_modal_data") or {}
    if not isinstance(data, Mapping) or set(data) - {"image"}:
        raise ValueError("multi_modal_data: only {'image': image or [images]} is served")
    images = data.get("image", ())
    if not isinstance(images, (list, tuple)):
        images = (images,)
    return text_or_ids, tuple(images)


def _prompt_batch(prompts: OfflinePrompt | Sequence[OfflinePrompt]) -> list[OfflinePrompt]:
    """The prompts of one call: a single prompt (a text, token ids, a dict) or a list of them."""
    if isinstance(prompts, (str, Mapping)) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
    ):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]


def _chat_images(conversation: Sequence[Mapping[str, Any]]
                 ) -> tuple[list[Mapping[str, Any]], tuple[Any, ...]]:
    """(the messages as the chat template takes them, their images in order): content parts
    ``text`` stay, ``image_url`` / ``image_pil`` become ``{"type": "image"}`` and their picture
    joins the images; a message of text parts only is their text joined by newlines."""
    messages: list[Mapping[str, Any]] = []
    images: list[Any] = []
    for i, message in enumerate(conversation):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            messages.append(message)
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            field = f"messages[{i}].content[{j}]"
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, Mapping) else url
                if not isinstance(url, str):
                    raise ValueError(f"{field}.image_url must hold a url")
                images.append(decode_data_url(url, f"{field}.image_url"))
                parts.append({"type": "image"})
            elif kind == "image_pil":
                images.append(part.get("image_pil"))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"{field}: parts of type text, image_url or image_pil are served, "
                                 f"got {kind!r}")
        if any(p["type"] == "image" for p in parts):
            messages.append({**message, "content": parts})
        else:
            messages.append({**message, "content": "\n".join(p["text"] for p in parts)})
    return messages, tuple(images)


class LLM:
    """Generate completions for batches of prompts with one model.

    ``engine_args`` are :class:`gpu_worker.config.EngineConfig` fields
    (``LLM(model="smollm2-135m", max_num_seqs=32, num_kv_blocks=256)``).
    """

    def __init__(self, model: str = "smollm2-135m", **engine_args: Any) -> None:
        self.engine = LLMEngine.from_config(EngineConfig.from_kwargs(model, **engine_args))
        self._ids = itertools.count()
        self._lora_paths: dict[str, str] = {}  # adapters loaded by load_lora_adapter: their folders

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: OfflinePrompt | Sequence[OfflinePrompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
        lora_request: LoraChoice | Sequence[LoraChoice] = None,
    ) -> list[RequestOutput]:
        """Complete each prompt (a string, a list of token ids, or vLLM's dict: ``{"prompt": ...}``
        or ``{"prompt_token_ids": [...]}`` with ``"multi_modal_data": {"image": image or
        [images]}``, each a ``PIL.Image`` or an encoded file's bytes, one per image token of the
        prompt); results in input order.

        Every prompt is validated before any runs: an invalid one raises ``ValueError``
        naming the field and nothing is generated. ``priority`` (one per prompt, lower runs
        first) orders them when the engine's ``scheduling_policy`` is ``priority``.
        ``lora_request``: the LoRA adapter (a :class:`LoRARequest` or its name, one for all
        prompts or one per prompt) among the engine's ``lora_modules``; None: the base model.
        """
        inputs = [_offline_prompt(p) for p in _prompt_batch(prompts)]
        return self._run([p for p, _ in inputs], sampling_params, priority, lora_request,
                         images=[i for _, i in inputs])

    def beam_search(
        self,
        prompts: OfflinePrompt | Sequence[OfflinePrompt],
        params: BeamSearchParams,
        lora_request: LoraChoice | Sequence[LoraChoice] = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``: each prompt's ``params.beam_width`` best beams, best first
        (``gpu_worker/beam_search.py``). Every step runs one token of every live beam of every
        prompt in one batch (the prefix cache serves what the beams share); ``text`` is each
        beam's tokens, the prompt's included, decoded (None without a tokenizer)."""
        batch = _prompt_batch(prompts)
        adapters = lora_names(lora_request, len(batch), self._served_loras())
        eos = self.engine.processor.eos_token_ids
        prompt_ids = [self._token_ids(p) for p in batch]
        max_len = self.engine.core.max_model_len
        searches = [BeamSearch(ids, resolve_max_tokens(params, len(ids), max_len), eos) for ids in prompt_ids]
        while not all(s.done for s in searches):
            live = [(i, beam) for i, s in enumerate(searches) if not s.done for beam in s.live]
            outputs = self._run([list(beam.tokens) for _, beam in live], searches[0].step_params(),
                                lora_request=[adapters[i] for i, _ in live])
            candidates: list[list[Any]] = [[] for _ in searches]
            for (i, _), output in zip(live, outputs, strict=True):
                candidates[i].append(candidates_of(output))
            for search, found in zip(searches, candidates, strict=True):
                if not search.done:
                    search.step(found)
        tokenizer = self.engine.tokenizer
        return [BeamSearchOutput([replace(b, text=None if tokenizer is None else tokenizer.decode(b.tokens))
                                  for b in s.best()]) for s in searches]

    def _token_ids(self, prompt: OfflinePrompt) -> list[int]:
        """A prompt's token ids (text through the engine's tokenizer); images are not served here."""
        text_or_ids, images = _offline_prompt(prompt)
        if images:
            raise ValueError("beam_search: prompts with images are not served")
        return list(self.engine.processor.tokenize(text_or_ids)[1])

    def embed(
        self, prompts: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]
    ) -> list[RequestOutput]:
        """Each prompt's embedding (``RequestOutput.embedding``), in input order: the engine must
        have been built with ``runner="pooling"`` (vLLM's ``LLM.embed``)."""
        if self.engine.core.config.runner != "pooling":
            raise ValueError('embed needs an engine built with runner="pooling" (LLM(..., runner="pooling"))')
        return self.generate(prompts)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        lora_request: LoraChoice | Sequence[LoraChoice] = None,
    ) -> list[RequestOutput]:
        """Complete one conversation or a list of them, rendered with the model's chat template
        (``continue_final_message``: the last message is continued, with
        ``add_generation_prompt=False``; ``tools`` and ``chat_template_kwargs`` go to the template,
        as vLLM's ``LLM.chat``). A message's ``content`` may be a list of parts: ``text``, and for
        a model that takes images ``image_url`` (a ``data:`` URL) or ``image_pil`` (a
        ``PIL.Image``), as vLLM takes them."""
        if messages and isinstance(messages[0], dict):
            conversations = [messages]
        else:
            conversations = list(messages)  # type: ignore[arg-type]
        chats = [_chat_images(c) for c in conversations]  # type: ignore[arg-type]
        prompts: list[PromptInput] = [
            ChatPrompt(tuple(c), add_generation_prompt, continue_final_message,
                       tools=tuple(tools) if tools else None, template_kwargs=chat_template_kwargs)
            for c, _ in chats
        ]
        return self._run(prompts, sampling_params, lora_request=lora_request, images=[i for _, i in chats])

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Serve the PEFT adapter at ``path`` (a folder under the engine's ``lora_root``) as
        ``name`` from now on, in a free LoRA slot (``max_loras``); ``ValueError`` naming why when
        refused (docs/LORA.md)."""
        self.engine.load_lora_adapter(name, path)
        self._lora_paths[name] = path

    def unload_lora_adapter(self, name: str) -> None:
        """Stop serving the adapter ``name`` (its slot is freed once its requests end)."""
        self.engine.unload_lora_adapter(name)

    def shutdown(self) -> None:
        """Release the engine's other ranks (tensor/pipeline parallel) now; with one rank there is
        nothing to release. Also what leaving a ``with LLM(...) as llm:`` block does."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (as vLLM's ``LLM.reset_prefix_cache``), e.g. between
        the runs of a benchmark that must start cold. False (nothing done) while requests run."""
        return self.engine.reset_prefix_cache()

    def _run(
        self,
        prompts: list[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        priority: Sequence[int] | None = None,
        lora_request: LoraChoice | Sequence[LoraChoice] = None,
        images: Sequence[Sequence[Any]] | None = None,
    ) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts"
                )
        priorities = [0] * len(prompts) if priority is None else [int(p) for p in priority]
        if len(priorities) != len(prompts):
            raise ValueError(f"priority has {len(priorities)} entries for {len(prompts)} prompts")
        adapters = lora_names(lora_request, len(prompts), self._served_loras())
        per_prompt = images if images is not None else [()] * len(prompts)
        processed = [
            self.engine.processor.process(str(next(self._ids)), prompt, params, priority=p, lora_name=name,
                                          images=pictures)
            for prompt, params, p, name, pictures in zip(
                prompts, params_list, priorities, adapters, per_prompt, strict=True)
        ]
        return self._run_to_completion(processed)

    def _served_loras(self) -> dict[str, str]:
        """Adapter name -> folder of every adapter the engine serves now (configured or loaded)."""
        paths = {**dict(self.engine.config.lora_adapters), **self._lora_paths}
        return {name: paths[name] for name in self.engine.processor.lora_names}

    def _run_to_completion(self, processed: list[ProcessedRequest]) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        try:
            for request in processed:
                self.engine.add_processed(request, OutputKind.FINAL_ONLY)
            # Collections inside the run skip what was alive before it (the model, the caller's
            # objects): a full one would stall every request (llmserve.gc_tuning).
            with objects_frozen():
                while self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        if output.finished:
                            results[output.request_id] = output
        except BaseException:
            self.engine.abort_request(r.request_id for r in processed if r.request_id not in results)
            raise
        return [results[r.request_id] for r in processed]
