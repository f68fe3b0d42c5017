"""EngineCore: one model, its KV pool and the step loop (schedule -> execute -> update).

Not thread-safe: exactly one thread drives it. The offline :class:`~gpu_worker.engine.
llm_engine.LLMEngine` calls :meth:`EngineCore.add_requests` / :meth:`EngineCore.step` itself;
every serving mode runs :meth:`EngineCore.run_busy_loop` (on a thread or in a child process,
:mod:`gpu_worker.engine.core_client`), whose turn :meth:`EngineCore.run_once` is the only
code that applies commands, steps for the front and counts step statistics. Requests arrive
validated (see :mod:`gpu_worker.engine.processor`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from gpu_worker.config import EngineConfig
from gpu_worker.core.kv_cache_manager import KVCacheManager
from gpu_worker.core.scheduler import Scheduler
from gpu_worker.core.types import EngineCoreOutput, EngineCoreRequest, SchedulerOutput, SchedulerStats
from gpu_worker.distributed.auto_size import resolve_parallel_sizes
from gpu_worker.engine.core_messages import (
    AbortRequests,
    AddFailed,
    AddRequest,
    Command,
    CoreInfo,
    LoadLora,
    QueryCachedHashes,
    ResetPrefixCache,
    Shutdown,
    StepResult,
    UnloadLora,
)
from gpu_worker.engine.image_inputs import ImageInputs, ImageLimits, check_image_model
from gpu_worker.executor.factory import make_executor
from gpu_worker.lora.registry import LoraRegistry
from gpu_worker.model_executor import loader
from gpu_worker.model_executor.layers.quantization.select import bytes_per_weight
from gpu_worker.model_executor.model_config import max_context_len
from gpu_worker.plugins.registry import scheduling_policy_registry
from gpu_worker.spec_decode.factory import load_draft_runner, make_proposer, share_kv_blocks
from gpu_worker.structured.manager import StructuredOutputManager
from gpu_worker.worker.model_runner import PendingRunnerOutput
from llmserve.kv_events import KVEvent

logger = logging.getLogger(__name__)

# Files of which at least one is present wherever ``AutoTokenizer.from_pretrained`` can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_STATS_INTERVAL_S = 0.05  # while stepping, a stats snapshot is reported at least this often


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

    ``max_model_len`` is the smallest of the configured value, the model's context length and
    the KV pool's token capacity, so a request that fits the context always fits the pool
    (preemption can always make progress). It is computed once, here; ``config`` is the
    effective configuration (device defaults and ``max_model_len`` filled in).

    With async scheduling (``config.async_scheduling``; auto: on CUDA) a step plans and
    launches step k+1 before it waits for step k's sampled ids, so scheduling, input
    preparation and output handling run while the device computes. Each ``step()`` then
    reports what step k produced. A token sampled for a request that step k already
    finished is dropped (it costs one wasted slot, never a wrong token).

    Speculative decoding (``config.speculative_config``): the scheduler asks the proposer for
    drafts when it plans a step (structured output cuts those a grammar forbids) and the target
    verifies them in that step. A draft model is loaded before the KV pool is sized and gets a
    pool of as many blocks as the target's, both within the KV budget
    (``gpu_worker/spec_decode/factory.py``). Async scheduling defaults to off then.

    ``kv_events``: record KV block stored/removed events for a fleet publisher
    (:meth:`take_kv_events`); off for the offline API, which has nobody to drain them.
    ``offline``: the offline API's device defaults (``EngineConfig.with_device_defaults``: a
    larger step token budget on H100 / H200-class cards).

    Device time (cost): each step's device time is split over the requests it computed, by
    tokens (``Scheduler.update``). A step's device time runs from the later of its launch (the
    start of its planning, ``schedule()``) and the previous step's completion, to its completion
    (its sampled ids are on the host, before ``update``). Synchronously that is
    schedule + inputs + model + sampling; with async scheduling or pipeline stages, where steps
    overlap, consecutive intervals tile the time the device had a step in flight, so no second
    is counted twice and idle time is counted for nobody.
    """

    def __init__(self, config: EngineConfig, kv_events: bool = True, offline: bool = False) -> None:
        self.device = loader.resolve_device(config.device)
        # Settles config.quantization (auto -> what the checkpoint is, docs/QUANTIZATION.md).
        config, source, self.hf_config = loader.resolve_served_model(config, self.device)
        skip = skips_tokenizer(config, source.model_dir)
        self.tokenizer: Any = None if skip else loader.load_tokenizer(source, config.tokenizer)
        self.eos_token_ids = loader.eos_token_ids(source, self.hf_config, self.tokenizer)
        self.vocab_size = int(self.hf_config.vocab_size)
        self.images = ImageInputs.load(source.model_dir, self.hf_config, self.tokenizer, ImageLimits(
            config.max_images_per_prompt, config.max_image_bytes, config.max_image_pixels))
        if self.images is not None:
            check_image_model(config)
        self.dtype = loader.resolve_dtype(config.dtype, self.device)
        config = config.with_device_defaults(self.device.type, offline=offline,
                                             large_gpu=loader.is_large_gpu(self.device))
        element_size = torch.empty((), dtype=self.dtype).element_size()
        kv_element_size = 1 if config.kv_cache_dtype == "fp8" else element_size
        config = resolve_parallel_sizes(
            config, self.hf_config, self.device,
            bytes_per_weight(config.quantization, element_size, self.hf_config),
            kv_element_size=kv_element_size,
        )
        self.executor = make_executor(config, self.device, self.dtype, self.eos_token_ids)
        self.runner = self.executor.runner  # the driver rank's
        self.draft_runner = load_draft_runner(config, self.device, self.dtype, frozenset(self.eos_token_ids))
        context_len = max_context_len(self.hf_config)
        if config.max_model_len is not None:
            context_len = min(context_len, config.max_model_len)
        # On CUDA without an explicit size, each rank's pool gets what a profiled maximum-size step
        # leaves on its device; the engine takes the smallest.
        self.num_kv_blocks = self.executor.determine_num_kv_blocks(context_len)
        self.num_kv_blocks = share_kv_blocks(config, self.num_kv_blocks, self.runner, self.draft_runner)
        self.weight_bytes = self.executor.weight_bytes  # every rank's, as stored (fp8, 4-bit, 16-bit)
        self.max_model_len = min(context_len, self.num_kv_blocks * config.block_size)
        self.config = config = dataclasses.replace(config, max_model_len=self.max_model_len)
        self.executor.initialize_kv_cache(self.num_kv_blocks, self.max_model_len)
        self.kv = KVCacheManager(
            self.num_kv_blocks, config.block_size, config.enable_prefix_caching, record_events=kv_events
        )
        # Grammars compile on a thread pool; a request waits in the queue until its grammar is ready.
        self.structured = StructuredOutputManager(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.proposer = make_proposer(
            config, self.draft_runner, self.num_kv_blocks, self.max_model_len, self.vocab_size,
            validate=self.structured.validate_drafts,
        )
        self.scheduler = Scheduler(
            self.kv,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.token_budget,
            max_model_len=self.max_model_len,
            block_size=config.block_size,
            hash_seed=config.model_name,
            overlap=config.pipeline_parallel_size == 1,
            policy=scheduling_policy_registry().get(config.scheduling_policy)(),
            ready=self.structured.is_ready,
            proposer=self.proposer,
        )
        self.async_scheduling = (
            self.device.type == "cuda" and config.speculative_config is None
            if config.async_scheduling is None
            else config.async_scheduling
        )
        # Steps in flight at once: 1 (synchronous), 2 (async scheduling: step k+1 is launched
        # before step k's ids are known) or, with pipeline stages, one micro-batch per stage.
        self._depth = config.pipeline_parallel_size if config.pipeline_parallel_size > 1 else (
            2 if self.async_scheduling else 1
        )
        # (plan, pending result, launch time) of each step in flight, oldest first
        self._in_flight: deque[tuple[SchedulerOutput, PendingRunnerOutput, float]] = deque()
        self._last_step_done = 0.0  # perf_counter() when the previous step's results arrived
        self._num_steps = 0  # steps run by run_once (reported in stats().extra)
        self._step_time_s = 0.0  # seconds inside step() during run_once (busy fraction = its rate)
        # LoRA adapters by slot: runtime loads and unloads (lora_root) go through it.
        self.lora = LoraRegistry(config.lora_adapters, config.num_lora_slots, config.lora_root,
                                 config.model_name)
        self._stats_key: tuple[int, int, int] | None = None
        self._stats_sent_at = 0.0
        logger.info(
            "engine core ready: model %s on %s (%s), quantization %s, weights %.2f GiB, KV cache %s: "
            "%d tokens (%d blocks of %d), max_model_len %d, max_num_batched_tokens %d",
            config.model_name, self.device, self.dtype, config.quantization, self.weight_bytes / 2**30,
            self.runner.kv_cache_dtype, self.num_kv_blocks * config.block_size, self.num_kv_blocks,
            config.block_size, self.max_model_len, config.token_budget,
        )

    def info(self) -> CoreInfo:
        """What a front needs to know of this core (also sent by a child process when ready)."""
        return CoreInfo(
            self.config, self.tokenizer, self.vocab_size, self.max_model_len,
            frozenset(self.eos_token_ids), self.stats(), weight_bytes=self.weight_bytes, images=self.images,
        )

    def warmup(self) -> None:
        """Run the model once on dummy inputs so the first request pays no start-up cost."""
        self.executor.warmup()
        if self.draft_runner is not None:
            self.draft_runner.warmup()

    def shutdown(self) -> None:
        """Stop the executor's other ranks (if any; idempotent)."""
        self.executor.shutdown()
        self.structured.shutdown()

    # ------------------------------------------------------------------ requests and steps

    def add_requests(self, core_requests: Sequence[EngineCoreRequest]) -> None:
        """Queue the core requests of one user request, all or none: when the scheduler refuses
        one (``ValueError``), those already added are aborted and the error is raised."""
        added: list[str] = []
        try:
            for request in core_requests:
                if request.lora_name and not self.lora.holds(request.lora_name):  # unloaded meanwhile
                    raise ValueError(f"LoRA adapter {request.lora_name[:64]!r} is not served here; served: "
                                     f"{list(self.lora.served)}")
                self.scheduler.add_request(request)
                added.append(request.request_id)
                self.structured.add(request)
        except ValueError:
            self.scheduler.abort(added)
            raise

    def abort(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        """Finish requests with ABORT and free their KV blocks; unknown ids are ignored."""
        return self.scheduler.abort(request_ids)

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Serve the adapter at ``path`` (under ``lora_root``) as ``name`` from the next step on
        (every rank writes it into a free slot); :class:`LoraUpdateError` or the adapter's
        ``ValueError`` when refused."""
        self.release_lora_slots()  # a slot whose last request finished is free for it
        change, digest = self.lora.plan_load(name, path)
        assert change.path is not None  # invariant: a load's change has its folder
        self.executor.load_lora(change.slot, name, change.path)
        self.lora.commit_load(change, digest)
        logger.info("LoRA adapter %s loaded from %s into slot %d", name, change.path, change.slot)

    def unload_lora_adapter(self, name: str) -> None:
        """Stop serving ``name`` to new requests; its slot is emptied once its live requests end
        (:meth:`release_lora_slots`). :class:`LoraUpdateError` when it is not loaded."""
        self.lora.begin_unload(name)
        self.release_lora_slots()
        logger.info("LoRA adapter %s unloaded (its slot is freed once its requests end)", name)

    def release_lora_slots(self) -> None:
        """Empty the slots of unloaded adapters that no live request holds any more (called after
        every step: the live requests are walked only while an unload waits)."""
        if not self.lora.unloading:
            return
        for change in self.lora.releasable(self.scheduler.live_lora_names()):
            self.executor.unload_lora(change.slot, change.name)

    def _lora_update(self, command: LoadLora | UnloadLora) -> BaseException | None:
        """A runtime load or unload's reply: None, or the error that refused it."""
        try:
            if isinstance(command, LoadLora):
                self.load_lora_adapter(command.name, command.path)
            else:
                self.unload_lora_adapter(command.name)
        except ValueError as exc:  # the adapter's own checks and LoraUpdateError: the caller's
            return exc
        return None

    def has_unfinished(self) -> bool:
        """Requests are live, or a launched step still has to be accounted for."""
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    def step(self) -> list[EngineCoreOutput]:
        """One engine step: plan and launch a step, and report what the oldest step in flight
        produced once as many steps as the depth allows are in flight (or nothing more can be
        planned). Synchronously that is the step just launched."""
        launched_at = time.perf_counter()
        if self._depth == 1:
            sched_out = self.structured.prepare_step(self.scheduler.schedule(), self.scheduler.get_request)
            runner_out = self.executor.execute(sched_out)
            return self.scheduler.update(sched_out, runner_out, self._device_time(launched_at))
        launched = False
        if self.scheduler.has_unfinished():
            sched_out = self.scheduler.schedule()  # async: may hold placeholders for the newest's samples
            sched_out = self.structured.prepare_step(sched_out, self.scheduler.get_request)
            if not sched_out.is_empty or sched_out.finished_req_ids or sched_out.preempted_req_ids:
                self._in_flight.append((sched_out, self.executor.execute_async(sched_out), launched_at))
                launched = True
        if not self._in_flight or (launched and len(self._in_flight) < self._depth):
            return []
        oldest, pending, oldest_launched_at = self._in_flight.popleft()
        runner_out = pending.result()
        return self.scheduler.update(oldest, runner_out, self._device_time(oldest_launched_at))

    def _device_time(self, launched_at: float) -> float:
        """The device time of the step whose results just arrived (class docstring)."""
        done = time.perf_counter()
        start = max(launched_at, self._last_step_done)
        self._last_step_done = done
        return done - start

    # ------------------------------------------------------------------ the serving loop

    def run_busy_loop(
        self, take_commands: Callable[[bool], list[Command]], emit: Callable[[StepResult], None]
    ) -> None:
        """Serve until a :class:`Shutdown` command: each turn takes the waiting commands
        (``take_commands(block)`` blocks for at least one when the core is idle), runs
        :meth:`run_once` and hands its result to ``emit``. A step that raises ends the loop with
        that exception (the caller fails every request in flight)."""
        try:
            while True:
                result = self.run_once(take_commands(not self.has_unfinished()))
                if result is None:
                    return
                emit(result)
        finally:
            self.shutdown()

    def run_once(self, commands: Sequence[Command]) -> StepResult | None:
        """One turn: apply ``commands`` in order, step once if there is work, report.

        None means a :class:`Shutdown` was among the commands (nothing after it is applied).
        """
        failed: list[AddFailed] = []
        replies: list[tuple[int, Any]] = []
        num_adds = 0
        for command in commands:
            if isinstance(command, Shutdown):
                return None
            if isinstance(command, AddRequest):
                num_adds += len(command.core_requests)
                try:
                    self.add_requests(command.core_requests)
                except ValueError as exc:
                    failed.append(AddFailed(command.request_id, exc))
            elif isinstance(command, AbortRequests):
                self.abort(command.core_ids)
            elif isinstance(command, QueryCachedHashes):
                replies.append((command.query_id, self.cached_block_hashes()))
            elif isinstance(command, ResetPrefixCache):
                replies.append((command.query_id, self.reset_prefix_cache()))
            elif isinstance(command, LoadLora | UnloadLora):
                replies.append((command.query_id, self._lora_update(command)))
        outputs: list[EngineCoreOutput] = []
        if self.has_unfinished():
            start = time.perf_counter()
            outputs = self.step()
            self._num_steps += 1
            self._step_time_s += time.perf_counter() - start
        self.release_lora_slots()
        eventful = bool(num_adds or failed or replies)
        return StepResult(outputs, self._stats_to_report(eventful), self.take_kv_events(), num_adds,
                          failed, replies)

    def _stats_to_report(self, eventful: bool) -> SchedulerStats | None:
        """A stats snapshot whenever the request counts change (or something was added, failed
        or queried), when the core goes idle (so the final state is always seen), and at least
        every ``_STATS_INTERVAL_S`` while stepping; None (keep the last one) otherwise."""
        stats = self.stats()
        key = (stats.num_running, stats.num_waiting, stats.num_preemptions)
        now = time.monotonic()
        if (
            eventful
            or not self.has_unfinished()
            or key != self._stats_key
            or now - self._stats_sent_at >= _STATS_INTERVAL_S
        ):
            self._stats_key, self._stats_sent_at = key, now
            return stats
        return None

    # ------------------------------------------------------------------ observability

    def stats(self) -> SchedulerStats:
        """Scheduler load, with ``engine_steps`` and ``engine_step_time_s`` (cumulative seconds
        inside :meth:`step` during :meth:`run_once`) in ``extra``: their rate over wall time is
        how busy the loop kept the device."""
        stats = self.scheduler.stats()
        extra = {"engine_steps": float(self._num_steps), "engine_step_time_s": self._step_time_s}
        return dataclasses.replace(stats, extra={**stats.extra, **extra})

    def take_kv_events(self) -> list[KVEvent]:
        """KV block stored/removed events since the last call."""
        return self.scheduler.take_kv_events()

    def cached_block_hashes(self) -> set[bytes]:
        """Hashes of every block in the prefix cache (for a full resync of the router's index)."""
        return self.scheduler.cached_block_hashes()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (benchmarks' cold runs); False while requests hold blocks."""
        return self.scheduler.reset_prefix_cache()
