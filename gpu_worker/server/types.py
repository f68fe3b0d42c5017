"""What the worker's server modules share: the engine interface they serve and one decoded call.

Kept apart from :mod:`gpu_worker.server.service` so that the service and its telemetry
(:mod:`gpu_worker.server.request_telemetry`) both import it and not each other.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gpu_worker.beam_search import BeamSearchParams, BeamSearchSequence
from gpu_worker.core.types import SchedulerStats
from gpu_worker.sampling_params import SamplingParams
from llmserve.kv_events import KVEvent
from llmserve.prompt_input import PromptInput


class ServedEngine(Protocol):
    """The part of ``gpu_worker.engine.async_llm.AsyncLLM`` the server uses."""

    @property
    def tokenizer(self) -> Any: ...
    @property
    def model_name(self) -> str: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def config(self) -> Any: ...
    @property
    def weight_bytes(self) -> int: ...
    @property
    def kv_cache_tokens(self) -> int: ...
    @property
    def lora_adapters(self) -> tuple[str, ...]: ...

    def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str,
        resumed_token_ids: Sequence[int] = (), priority: int = 0, lora_name: str = "",
        images: Sequence[bytes] = (),
    ) -> AsyncGenerator[Any, None]: ...
    async def abort(self, request_id: str) -> None: ...
    def stats(self) -> SchedulerStats: ...
    def take_kv_events(self) -> list[KVEvent]: ...
    async def cached_block_hashes(self) -> set[bytes]: ...
    async def beam_search(self, prompt: PromptInput, params: BeamSearchParams, request_id: str,
                          lora_name: str = "", priority: int = 0
                          ) -> tuple[list[int], list[BeamSearchSequence]]: ...
    async def load_lora_adapter(self, name: str, path: str) -> None: ...
    async def unload_lora_adapter(self, name: str) -> None: ...
    async def shutdown(self) -> None: ...
    def on_dead(self, callback: Callable[[BaseException], None]) -> None: ...


@dataclass(frozen=True)
class GenerateCall:
    """One decoded Generate request. ``resumed_token_ids``: outputs another worker generated
    before it failed (a router resumes the stream here)."""

    model: str
    prompt: PromptInput
    params: SamplingParams
    request_id: str
    resumed_token_ids: tuple[int, ...] = ()
    priority: int = 0  # lower runs first (with --scheduling-policy priority)
    embed: bool = False  # GenerateRequest.task TASK_EMBED: the prompt's embedding
    images: tuple[bytes, ...] = ()  # the prompt's images, as encoded files (GenerateRequest.images)
    beam: BeamSearchParams | None = None  # SamplingParams.beam_search: the params' n best beams
