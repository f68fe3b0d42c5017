"""The engine core's view of the model: build, size the KV pool, warm up, run steps.

One rank: :class:`~gpu_worker.executor.uniproc.UniProcExecutor` calls the runner in the core's
process and costs nothing. Several ranks (tensor / pipeline parallel):
:class:`~gpu_worker.executor.multiproc.MultiprocExecutor` runs rank 0 here and one process per
other device, and sends each step's plan to all of them.
"""

from __future__ import annotations

import logging
import resource
from abc import ABC, abstractmethod
from typing import Any

import torch

from gpu_worker.config import EngineConfig
from gpu_worker.core.types import RunnerOutput, SchedulerOutput
from gpu_worker.distributed.parallel_state import ModelParallel
from gpu_worker.model_executor import loader
from gpu_worker.worker import kv_sizing
from gpu_worker.worker.model_runner import ModelRunner, PendingRunnerOutput
from kernels import get_ops

logger = logging.getLogger(__name__)


class Executor(ABC):
    """Runs the engine core's steps on the model shard(s). ``runner`` is the driver rank's."""

    runner: ModelRunner
    # Weight bytes of every rank together (set by executors with several ranks when they size
    # the KV pool); None: the driver's runner holds all of them.
    total_weight_bytes: int | None = None

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's weights over all ranks (as stored: fp8, packed 4-bit, 16-bit)."""
        return self.runner.weight_bytes if self.total_weight_bytes is None else self.total_weight_bytes

    @abstractmethod
    def determine_num_kv_blocks(self, max_seq_len: int) -> int:
        """KV blocks every rank can hold (the smallest over ranks), profiling a maximum-size
        step of sequences up to ``max_seq_len`` tokens where the pool is sized from free memory."""

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int, max_model_len: int) -> None:
        """Allocate every rank's KV pool and per-request state."""

    @abstractmethod
    def warmup(self) -> None:
        """Dummy steps and CUDA graph capture on every rank."""

    @abstractmethod
    def execute_async(self, sched: SchedulerOutput) -> PendingRunnerOutput:
        """Launch one step on every rank; the sampled ids come with the pending output."""

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.execute_async(sched).result()

    def load_lora(self, slot: int, name: str, path: str) -> None:
        """Load an adapter into LoRA slot ``slot`` on every rank (between steps; ``ValueError``
        naming the adapter's problem, found on this rank before any other reads it)."""
        self.runner.load_lora(slot, name, path)

    def unload_lora(self, slot: int, name: str) -> None:
        """Empty LoRA slot ``slot`` on every rank (no request holds it)."""
        self.runner.unload_lora(slot, name)

    def shutdown(self) -> None:  # noqa: B027 - one rank holds nothing to release
        """Stop the other ranks (if any)."""


def load_runner(
    config: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    eos_token_ids: frozenset[int] | tuple[int, ...],
    parallel: ModelParallel | None = None,
) -> ModelRunner:
    """This rank's model shard (its slice of the checkpoint) in a runner with no KV pool yet.

    Logs the shard's weight bytes and how much this process's peak resident memory grew while
    loading it (each rank reads only its slices, so it holds about its share)."""
    source = loader.resolve_model(config.model, gguf_quantized=config.quantization == "gguf")
    hf_config = loader.load_hf_config(source)
    rss_before = _reset_peak_resident()
    model = loader.load_model(config, device, dtype, source=source, hf_config=hf_config, parallel=parallel)
    if config.num_lora_slots:
        _attach_lora(model, config, hf_config, device, dtype)
    grew = _peak_resident() - rss_before
    rank = 0 if parallel is None else parallel.pp_rank * parallel.tp.size + parallel.tp.rank
    runner = ModelRunner(config, model, hf_config, device, dtype, eos_token_ids)
    logger.info(
        "rank %d loaded its model shard: %d MiB of weights (quantization %s) on %s; peak resident memory "
        "grew by %d MiB", rank, runner.weight_bytes >> 20, config.quantization, device, max(grew, 0) >> 20,
    )
    return runner


def _attach_lora(model: Any, config: EngineConfig, hf_config: Any, device: torch.device,
                 dtype: torch.dtype) -> None:
    """Load ``config.lora_modules`` (each adapter checked against the model's sizes) into this
    rank's layers (gpu_worker/lora/layers.py). 16/32-bit weights only: a quantized layer's
    input may be an fp8 activation, which the adapters' product cannot take."""
    from gpu_worker.lora.adapter import adapter_shapes_of, load_adapter
    from gpu_worker.lora.layers import attach_lora
    from gpu_worker.model_executor.layers.quantization.base import UnquantizedLinearMethod

    if any(not isinstance(m.linear_method, UnquantizedLinearMethod)
           for m in model.modules() if hasattr(m, "in_features_local")):  # the parallel linear layers
        raise ValueError("lora_modules needs 16/32-bit weights; this checkpoint is quantized")
    shapes = adapter_shapes_of(hf_config)
    adapters = [load_adapter(name, path, **shapes, max_rank=config.max_lora_rank)
                for name, path in config.lora_adapters]
    ops = get_ops(device, fp8_weight_only_max_m=config.fp8_weight_only_max_tokens, pdl=config.enable_pdl)
    # the most tokens of a step, a graph's padding included
    max_tokens = max(config.max_num_batched_tokens or 0, config.max_num_seqs) + 1
    attach_lora(model, adapters, max_rank=config.max_lora_rank, max_tokens=max_tokens, device=device,
                dtype=dtype, ops=ops, num_slots=config.num_lora_slots)
    logger.info("LoRA: %d slots (max rank %d), adapters loaded: %s", config.num_lora_slots,
                config.max_lora_rank, ", ".join(a.name for a in adapters) or "none")


def _reset_peak_resident() -> int:
    """Reset this process's peak resident memory to the current one (Linux: ``clear_refs``);
    returns the current resident bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def _peak_resident() -> int:
    """Peak resident bytes since the last reset (``VmHWM``; ``ru_maxrss`` where there is none)."""
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rank_num_kv_blocks(runner: ModelRunner, max_seq_len: int) -> int:
    """This rank's KV pool size (profiling its maximum-size step when sized from free memory)."""
    profile = lambda: runner.profile_run(max_seq_len)  # noqa: E731 - only when sized from free memory
    return kv_sizing.num_kv_blocks(
        runner.config, runner.kv_cache_spec, runner.device, runner.kv_cache_dtype, profile
    )
