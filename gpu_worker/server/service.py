"""What the worker does for each RPC, in domain terms (no protobuf here).

:class:`WorkerService` owns the admission rules (ready, draining, served model,
concurrent-stream limit), keeps the set of requests in flight so a drain can wait for
them and abort the rest, and reports load. The servicer translates protobuf to and from
the objects used here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from gpu_worker.core.types import SchedulerStats
from gpu_worker.engine.errors import QueueFullError
from gpu_worker.outputs import CompletionOutput, RequestOutput
from gpu_worker.server.errors import InvalidRequest, ModelNotFound, NoTokenizer, Overloaded, Unavailable
from gpu_worker.server.request_telemetry import RequestTelemetry
from gpu_worker.server.tokenizer_files import tokenizer_files
from gpu_worker.server.types import GenerateCall, ServedEngine
from llmserve.limits import LimitExceeded, RequestLimits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    """A model this worker serves (``standby``: as a warm standby, not yet promoted), its weight
    format and KV cache (docs/QUANTIZATION.md)."""

    name: str
    max_model_len: int
    standby: bool = False
    quantization: str = ""
    kv_cache_dtype: str = ""
    weight_bytes: int = 0
    kv_cache_tokens: int = 0
    parent: str = ""  # a LoRA adapter's base model ("" for the base model)


@dataclass(frozen=True)
class WorkerSnapshot:
    """Identity, limits and load of the worker at one instant."""

    worker_id: str
    model: str
    address: str
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_queue_len: int
    draining: bool
    stats: SchedulerStats


class WorkerService:
    """Admission, in-flight tracking and load reporting for one served engine.

    Every admitted Generate is observed by ``telemetry`` (span, metrics, request log line).
    ``limits`` are the per-request limits the servicer checks while decoding; every refusal by
    a limit (those, the stream limit, the engine's queue and context limits) is counted in
    ``llmserve:request_refusals_total`` through :meth:`on_refusal`.
    """

    def __init__(
        self,
        model_name: str,
        worker_id: str,
        address: str,
        max_concurrent_streams: int,
        telemetry: RequestTelemetry,
        limits: RequestLimits | None = None,
        adapters: tuple[str, ...] = (),
    ) -> None:
        self.model_name = model_name
        self._adapters = adapters  # until the engine is attached: the configured ones
        self._adapter_listeners: list[Callable[[tuple[str, ...]], Awaitable[None]]] = []
        self.worker_id = worker_id
        self.address = address
        self.max_concurrent_streams = max_concurrent_streams
        self.limits = limits if limits is not None else RequestLimits()
        self._engine: ServedEngine | None = None
        self._draining = False
        self._in_flight: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tokenizer_files: dict[str, bytes] | None = None
        self._telemetry = telemetry
        self.standby = False  # a warm standby not yet promoted (set by the server)

    # -- lifecycle -------------------------------------------------------------------
    def attach_engine(self, engine: ServedEngine) -> None:
        """Called once the engine is loaded and warmed up: the worker starts accepting."""
        self._engine = engine

    @property
    def engine(self) -> ServedEngine:
        if self._engine is None:
            raise Unavailable("worker is not ready: the model is still loading")
        return self._engine

    @property
    def adapters(self) -> tuple[str, ...]:
        """LoRA adapters served beside the model, each a model name (runtime loads included)."""
        return self._engine.lora_adapters if self._engine is not None else self._adapters

    def on_adapters_changed(self, listener: Callable[[tuple[str, ...]], Awaitable[None]]) -> None:
        """Call ``listener(adapters)`` after each runtime load or unload (the fleet record)."""
        self._adapter_listeners.append(listener)

    async def load_lora_adapter(self, name: str, path: str) -> tuple[str, ...]:
        """Serve the adapter at ``path`` (under the engine's ``lora_root``) as ``name``; the
        adapters served afterwards. ``LoraUpdateError`` / ``ValueError`` when refused."""
        if self._draining:
            raise Unavailable("worker is draining")
        await self.engine.load_lora_adapter(name, path)
        return await self._adapters_changed()

    async def unload_lora_adapter(self, name: str) -> tuple[str, ...]:
        """Stop serving ``name`` to new requests (its running ones finish on it)."""
        await self.engine.unload_lora_adapter(name)
        return await self._adapters_changed()

    async def _adapters_changed(self) -> tuple[str, ...]:
        adapters = self.adapters
        for listener in self._adapter_listeners:
            await listener(adapters)
        return adapters

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def draining(self) -> bool:
        return self._draining

    def start_draining(self) -> int:
        """Refuse new requests from now on; return how many are in flight."""
        self._draining = True
        return len(self._in_flight)

    @property
    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False if the timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def abort_all(self) -> None:
        """Abort every request in flight in the engine (their streams end with "abort")."""
        for request_id in list(self._in_flight):
            await self.engine.abort(request_id)

    # -- RPCs ------------------------------------------------------------------------
    def on_refusal(self, limit: str) -> None:
        """Count a request refused by ``limit``."""
        self._telemetry.metrics.on_refusal(self.model_name, limit)

    def check_model(self, model: str) -> str:
        """The LoRA adapter ``model`` names ("" for the served model, or an empty name);
        NOT_FOUND unless it is one of the served names."""
        if not model or model == self.model_name:
            return ""
        if model in self.adapters:
            return model
        raise ModelNotFound(model, [self.model_name, *self.adapters])

    def check_task(self, embed: bool) -> None:
        """INVALID_ARGUMENT unless the request's task is what this worker's runner serves."""
        pooling = getattr(self.engine.config, "runner", "generate") == "pooling"
        if embed and not pooling:
            raise InvalidRequest(f"model {self.model_name!r} generates text (runner generate): it has no "
                                 "embeddings; serve an embedding model with --runner pooling")
        if pooling and not embed:
            raise InvalidRequest(f"model {self.model_name!r} serves embeddings (runner pooling): ask for "
                                 "task TASK_EMBED (the OpenAI door's /v1/embeddings)")

    async def generate(self, call: GenerateCall) -> AsyncGenerator[Any, None]:
        """Admit ``call`` and yield the engine's delta ``RequestOutput``s.

        Closing or cancelling the returned iterator closes the engine's iterator, which
        aborts the request and frees its KV blocks.
        """
        if self._draining:
            raise Unavailable("worker is draining")
        engine = self.engine
        lora_name = self.check_model(call.model)
        self.check_task(call.embed)
        if len(self._in_flight) >= self.max_concurrent_streams:
            self.on_refusal("max_concurrent_streams")
            raise Overloaded(
                f"too many concurrent streams: the limit is {self.max_concurrent_streams} "
                "(max_concurrent_streams, flag --max-concurrent-streams)"
            )
        if call.request_id in self._in_flight:
            raise ValueError(f"request_id {call.request_id!r} is already in flight")
        self._in_flight.add(call.request_id)
        self._idle.clear()
        try:
            with self._telemetry.observe(call) as observation:
                if call.beam is not None:
                    output = await self._beam_search(call, lora_name)
                    observation.on_output(output)
                    yield output
                    return
                outputs = engine.generate(call.prompt, call.params, call.request_id, call.resumed_token_ids,
                                          priority=call.priority, lora_name=lora_name, images=call.images)
                async with aclosing(outputs):
                    async for output in outputs:
                        observation.on_output(output)
                        yield output
        except (LimitExceeded, QueueFullError) as exc:
            self.on_refusal(exc.limit)
            raise
        finally:
            self._in_flight.discard(call.request_id)
            if not self._in_flight:
                self._idle.set()

    async def _beam_search(self, call: GenerateCall, lora_name: str) -> RequestOutput:
        """A beam search call's one output: its ``n`` best beams as finished sequences."""
        assert call.beam is not None  # invariant: called for beam search calls only
        engine = self.engine
        prompt_ids, beams = await engine.beam_search(call.prompt, call.beam, call.request_id,
                                                     lora_name=lora_name, priority=call.priority)
        tokenizer = engine.tokenizer
        sequences = []
        for index, beam in enumerate(beams[: call.params.n]):
            ids = list(beam.output_token_ids)
            text = "" if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True)
            logprobs = [dict(p) for p in beam.logprobs] if call.params.logprobs is not None else None
            sequences.append(CompletionOutput(index, text, ids, beam.cum_logprob, logprobs,
                                              beam.finish_reason))
        return RequestOutput(call.request_id, None, prompt_ids, sequences, finished=True)

    def list_models(self) -> list[ModelEntry]:
        engine = self._engine
        if engine is None:
            return [ModelEntry(self.model_name, 0, self.standby)]
        config = engine.config
        return [ModelEntry(name, engine.max_model_len, self.standby, config.quantization,
                           config.kv_cache_dtype, engine.weight_bytes, engine.kv_cache_tokens,
                           parent=self.model_name if name != self.model_name else "")
                for name in (self.model_name, *self.adapters)]

    def snapshot(self) -> WorkerSnapshot:
        """Current identity and load (GetWorkerInfo, heartbeats)."""
        engine = self.engine
        config = engine.config
        return WorkerSnapshot(
            worker_id=self.worker_id,
            model=self.model_name,
            address=self.address,
            block_size=engine.block_size,
            max_model_len=engine.max_model_len,
            max_num_seqs=int(config.max_num_seqs),
            max_queue_len=int(config.max_queue_len),
            draining=self._draining,
            stats=engine.stats(),
        )

    async def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer as files (computed once, off the event loop); FAILED_PRECONDITION without one."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise NoTokenizer(self.model_name)
        if self._tokenizer_files is None:
            images = getattr(self.engine, "images", None)  # the engine's image inputs (a model taking images)
            self._tokenizer_files = await asyncio.to_thread(
                tokenizer_files, tokenizer, None if images is None else images.tokens)
        return self._tokenizer_files
