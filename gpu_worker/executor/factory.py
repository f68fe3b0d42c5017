"""Choosing the executor for an engine: one rank in-process, or one process per other rank."""

from __future__ import annotations

import torch

from gpu_worker.config import EngineConfig
from gpu_worker.distributed.parallel_state import ParallelConfig
from gpu_worker.executor.base import Executor, load_runner
from gpu_worker.executor.uniproc import UniProcExecutor


def make_executor(
    config: EngineConfig, device: torch.device, dtype: torch.dtype, eos_token_ids: frozenset[int]
) -> Executor:
    """Load the model (each rank its shard) behind the executor ``config``'s parallel sizes ask for."""
    parallel = ParallelConfig(config.tensor_parallel_size, config.pipeline_parallel_size)
    if parallel.world_size == 1:
        return UniProcExecutor(load_runner(config, device, dtype, eos_token_ids))
    if device.type == "cuda" and torch.cuda.device_count() < parallel.world_size:
        raise ValueError(
            f"tensor_parallel_size x pipeline_parallel_size = {parallel.world_size} ranks need as many "
            f"GPUs; {torch.cuda.device_count()} are visible"
        )
    from gpu_worker.executor.multiproc import MultiprocExecutor  # spawns processes: only when asked

    return MultiprocExecutor(config, parallel, device, dtype, eos_token_ids)
