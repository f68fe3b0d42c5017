"""LLMEngine: the synchronous engine (input processor + engine core + output processor).

The caller drives it: ``add_request`` then ``step()`` until ``has_unfinished_requests()``
is False. Used by the offline :class:`gpu_worker.llm.LLM`. It calls the core directly (vLLM's
in-process client) through the same all-or-none add (:meth:`EngineCore.add_requests`) the
serving loop uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gpu_worker.config import EngineConfig
from gpu_worker.core.types import SchedulerStats
from gpu_worker.engine.core import EngineCore
from gpu_worker.engine.output_processor import OutputKind, OutputProcessor
from gpu_worker.engine.processor import InputProcessor, ProcessedRequest
from gpu_worker.outputs import RequestOutput
from gpu_worker.sampling_params import SamplingParams
from llmserve.prompt_input import PromptInput


class LLMEngine:
    """Synchronous engine over one :class:`EngineCore`; single-threaded use only."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.processor = InputProcessor(
            core.tokenizer, core.vocab_size, core.max_model_len, core.eos_token_ids,
            pooling=core.config.runner == "pooling",
            lora_names=frozenset(name for name, _ in core.config.lora_adapters), images=core.images,
        )
        self.output_processor = OutputProcessor(core.tokenizer)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Load the model (blocking) and warm it up. No KV events are recorded: offline, nobody
        publishes them; the offline defaults apply (``EngineConfig.with_device_defaults``)."""
        core = EngineCore(config, kv_events=False, offline=True)
        core.warmup()
        return cls(core)

    @property
    def tokenizer(self) -> Any:
        return self.core.tokenizer

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    def add_request(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        kind: OutputKind = OutputKind.CUMULATIVE,
        priority: int = 0,
    ) -> None:
        """Validate (``ValueError`` naming the field) and queue a request."""
        self.add_processed(self.processor.process(request_id, prompt, params, priority=priority), kind)

    def add_processed(self, processed: ProcessedRequest, kind: OutputKind) -> None:
        """Queue a request already validated by ``self.processor`` (all its samples or none)."""
        self.output_processor.add_request(processed, kind)
        try:
            self.core.add_requests(processed.core_requests)
        except BaseException:
            self.output_processor.abort_request(processed.request_id)
            raise

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Serve the adapter at ``path`` (under ``lora_root``) as ``name`` from now on."""
        self.core.load_lora_adapter(name, path)
        self.processor.lora_names = self.processor.lora_names | {name}

    def unload_lora_adapter(self, name: str) -> None:
        """Stop serving ``name``; its slot is freed once its requests end."""
        self.processor.lora_names = self.processor.lora_names - {name}
        self.core.unload_lora_adapter(name)

    def abort_request(self, request_ids: Iterable[str]) -> None:
        """Forget requests and free their KV blocks; unknown ids are ignored."""
        for request_id in request_ids:
            core_ids, _ = self.output_processor.abort_request(request_id)
            self.core.abort(core_ids)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.num_unfinished > 0

    def step(self) -> list[RequestOutput]:
        """Run one engine step; outputs of the requests it changed (per their OutputKind)."""
        processed = self.output_processor.process_outputs(self.core.step())
        if processed.reqs_to_abort:  # finished by a stop string: free their KV now
            self.core.abort(processed.reqs_to_abort)
        return processed.request_outputs

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (cold-cache runs); False while requests hold blocks."""
        return self.core.reset_prefix_cache()

    def stats(self) -> SchedulerStats:
        return self.core.stats()

    def shutdown(self) -> None:
        """Stop the other ranks of a multi-GPU engine (a no-op with one rank)."""
        self.core.shutdown()
