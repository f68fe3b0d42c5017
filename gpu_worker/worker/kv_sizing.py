"""How many KV blocks fit: from an explicit count, a byte budget, or free GPU memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gpu_worker.config import EngineConfig
from gpu_worker.model_executor.model_config import head_dim_of

CPU_DEFAULT_KV_BYTES = 512 * 1024 * 1024


def kv_bytes_per_block(hf_config: Any, block_size: int, dtype: torch.dtype) -> int:
    """K and V of ``block_size`` tokens across all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = (
        2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * head_dim_of(hf_config) * elem
    )
    return int(per_token * block_size)


def num_kv_blocks(
    config: EngineConfig,
    hf_config: Any,
    device: torch.device,
    dtype: torch.dtype,
    profile_peak_bytes: Callable[[], int] | None = None,
) -> int:
    """Blocks for the KV pool, in order of precedence.

    1. ``config.num_kv_blocks``; 2. ``config.kv_cache_memory_bytes`` (CPU default 512 MiB when
    neither is set); 3. on CUDA: ``gpu_memory_utilization * total - peak``, where ``peak`` is what
    ``profile_peak_bytes()``
    measured for a maximum-size step, weights included (``ModelRunner.profile_run``).
    """
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = kv_bytes_per_block(hf_config, config.block_size, dtype)
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
