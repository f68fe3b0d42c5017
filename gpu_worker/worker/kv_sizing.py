"""How many KV blocks fit: from an explicit count, a byte budget, or free GPU memory."""

from __future__ import annotations

from collections.abc import Callable

import torch

from gpu_worker.config import EngineConfig
from gpu_worker.model_executor.model_config import KVCacheSpec

CPU_DEFAULT_KV_BYTES = 512 * 1024 * 1024


def kv_bytes_per_block(spec: KVCacheSpec, block_size: int, dtype: torch.dtype) -> int:
    """K and V of ``block_size`` tokens across this rank's layers and KV heads."""
    return spec.bytes_per_block(block_size, torch.empty((), dtype=dtype).element_size())


def num_kv_blocks(
    config: EngineConfig,
    spec: KVCacheSpec,
    device: torch.device,
    dtype: torch.dtype,
    profile_peak_bytes: Callable[[], int] | None = None,
) -> int:
    """Blocks for one rank's KV pool (``spec``: its layers and KV heads), in order of precedence.

    1. ``config.num_kv_blocks``; 2. ``config.kv_cache_memory_bytes`` per rank (CPU default 512 MiB
    when neither is set); 3. on CUDA: ``gpu_memory_utilization * total - peak``, where ``peak`` is
    what ``profile_peak_bytes()`` measured for a maximum-size step, weights included
    (``ModelRunner.profile_run``). With several ranks the engine takes the smallest answer.
    """
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = kv_bytes_per_block(spec, config.block_size, dtype)
    budget = config.kv_cache_memory_bytes
    if budget is None and device.type != "cuda":
        budget = CPU_DEFAULT_KV_BYTES
    if budget is None:
        if profile_peak_bytes is None:
            raise ValueError("sizing the KV pool from gpu_memory_utilization needs a profiling run")
        peak = profile_peak_bytes()
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(config.gpu_memory_utilization * total) - peak
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(
            f"KV budget of {budget} bytes holds no block of {per_block} bytes; "
            "raise kv_cache_memory_bytes / gpu_memory_utilization"
        )
    return int(blocks)
