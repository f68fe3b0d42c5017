"""EngineCore: one model, its KV pool and the step loop (schedule -> execute -> update).

Not thread-safe: exactly one thread drives it (the caller of LLMEngine, or AsyncLLM's
core thread). Requests arrive validated (see :mod:`gpu_worker.engine.processor`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gpu_worker.config import EngineConfig
from gpu_worker.core.kv_cache_manager import KVCacheManager
from gpu_worker.core.kv_events import KVEvent
from gpu_worker.core.scheduler import Scheduler
from gpu_worker.core.types import EngineCoreOutput, EngineCoreRequest, SchedulerOutput, SchedulerStats
from gpu_worker.model_executor import loader
from gpu_worker.worker import kv_sizing
from gpu_worker.worker.model_runner import ModelRunner, PendingRunnerOutput

logger = logging.getLogger(__name__)

# Files of which at least one is present wherever ``AutoTokenizer.from_pretrained`` can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def skips_tokenizer(config: EngineConfig, model_dir: Path) -> bool:
    """Serve without a tokenizer: asked for, or random weights from a folder that has none."""
    if config.skip_tokenizer_init:
        return True
    return (
        config.load_format == "dummy"
        and config.tokenizer is None
        and not any((model_dir / name).is_file() for name in _TOKENIZER_FILES)
    )


class EngineCore:
    """Loads the model and tokenizer, sizes the KV pool and runs engine steps.

    ``tokenizer`` is None when the model is served without one (:func:`skips_tokenizer`);
    EOS ids then come from the config and generation_config.json alone.

    ``max_model_len`` is the smallest of the configured value, the model's context
    length and the KV pool's token capacity, so a request that fits the context always
    fits the pool (preemption can always make progress).

    With async scheduling (``config.async_scheduling``; auto: on CUDA) a step plans and
    launches step k+1 before it waits for step k's sampled ids, so scheduling, input
    preparation and output handling run while the device computes. Each ``step()`` then
    reports what step k produced. A token sampled for a request that step k already
    finished is dropped (it costs one wasted slot, never a wrong token).
    """

    def __init__(self, config: EngineConfig) -> None:
        source = loader.resolve_model(config.model)
        self.hf_config = loader.load_hf_config(source)
        skip = skips_tokenizer(config, source.model_dir)
        self.tokenizer: Any = None if skip else loader.load_tokenizer(source, config.tokenizer)
        self.eos_token_ids = loader.eos_token_ids(source, self.hf_config, self.tokenizer)
        self.vocab_size = int(self.hf_config.vocab_size)
        self.device = loader.resolve_device(config.device)
        self.dtype = loader.resolve_dtype(config.dtype, self.device)
        model = loader.load_model(config, self.device, self.dtype, source=source, hf_config=self.hf_config)
        # On CUDA without an explicit size, the pool gets what a profiled maximum-size step leaves.
        self.num_kv_blocks = kv_sizing.num_kv_blocks(
            config,
            self.hf_config,
            self.device,
            self.dtype,
            lambda: kv_sizing.profile_peak_bytes(config, model, self.hf_config, self.device, self.dtype),
        )
        self.max_model_len = self._max_model_len(config)
        # From here on the config carries the effective context length.
        self.config = config = dataclasses.replace(config, max_model_len=self.max_model_len)
        self.kv = KVCacheManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.kv,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            block_size=config.block_size,
            hash_seed=config.model_name,
        )
        self.runner = ModelRunner(
            config, model, self.hf_config, self.device, self.dtype, self.num_kv_blocks, self.eos_token_ids
        )
        self.async_scheduling = (
            self.device.type == "cuda" if config.async_scheduling is None else config.async_scheduling
        )
        self._in_flight: tuple[SchedulerOutput, PendingRunnerOutput] | None = None
        logger.info(
            "engine core ready: model %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d",
            config.model_name, self.device, self.dtype, self.num_kv_blocks, config.block_size,
            self.max_model_len,
        )

    def _max_model_len(self, config: EngineConfig) -> int:
        limits = [loader.max_context_len(self.hf_config), self.num_kv_blocks * config.block_size]
        if config.max_model_len is not None:
            limits.append(config.max_model_len)
        return min(limits)

    def warmup(self) -> None:
        """Run the model once on dummy inputs so the first request pays no start-up cost."""
        self.runner.warmup()

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a validated request (``ValueError`` if the scheduler refuses it)."""
        self.scheduler.add_request(request)

    def abort(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        """Finish requests with ABORT and free their KV blocks; unknown ids are ignored."""
        return self.scheduler.abort(request_ids)

    def has_unfinished(self) -> bool:
        """Requests are live, or a launched step still has to be accounted for."""
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[EngineCoreOutput]:
        """One engine step: what each request scheduled in it (async: in the step before) produced."""
        if not self.async_scheduling:
            sched_out = self.scheduler.schedule()
            return self.scheduler.update(sched_out, self.runner.execute(sched_out))
        in_flight = self._in_flight
        self._in_flight = None
        if self.scheduler.has_unfinished():
            sched_out = self.scheduler.schedule()  # may contain placeholders for in_flight's samples
            if not sched_out.is_empty or sched_out.finished_req_ids or sched_out.preempted_req_ids:
                self._in_flight = (sched_out, self.runner.execute_async(sched_out))
        if in_flight is None:
            return []
        return self.scheduler.update(in_flight[0], in_flight[1].result())

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def take_kv_events(self) -> list[KVEvent]:
        """KV block stored/removed events since the last call."""
        return self.scheduler.take_kv_events()

    def cached_block_hashes(self) -> set[bytes]:
        """Hashes of every block in the prefix cache (for a full resync of the router's index)."""
        return self.scheduler.cached_block_hashes()
