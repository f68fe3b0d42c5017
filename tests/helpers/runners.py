"""Model runners built the way the engine core builds them, for tests that drive a runner alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpu_worker.config import EngineConfig
from gpu_worker.model_executor import loader
from gpu_worker.model_executor.model_config import max_context_len
from gpu_worker.worker.model_runner import ModelRunner


def build_runner(
    model_dir: Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_kv_blocks: int = 96,
    model: nn.Module | None = None,
    **engine_args: Any,
) -> ModelRunner:
    """A runner over ``model_dir`` (or over ``model``, built from its config) with a pool of
    ``num_kv_blocks`` blocks, as ``EngineCore`` sets it up (device defaults, context cap)."""
    dev = torch.device(device)
    config = EngineConfig(model=str(model_dir), num_kv_blocks=num_kv_blocks, **engine_args)
    config = config.with_device_defaults(dev.type)
    source = loader.resolve_model(config.model, gguf_quantized=config.quantization == "gguf")
    hf_config = loader.load_hf_config(source)
    if model is None:
        model = loader.load_model(config, dev, dtype, source=source, hf_config=hf_config)
    eos = loader.eos_token_ids(source, hf_config)
    runner = ModelRunner(config, model, hf_config, dev, dtype, eos)
    limits = [max_context_len(hf_config), num_kv_blocks * config.block_size]
    if config.max_model_len is not None:
        limits.append(config.max_model_len)
    runner.initialize_kv_cache(num_kv_blocks, min(limits))
    return runner


def prefill_step(runner: ModelRunner, req_id: str, prompt: list[int], first_block: int = 0) -> None:
    """One engine-shaped step (``runner.execute``, a real step: the first computes fp8 KV
    scales) prefilling ``prompt`` as a new request in blocks from ``first_block``, then its end."""
    from gpu_worker.core.types import ScheduledRequest, SchedulerOutput
    from gpu_worker.sampling_params import SamplingParams

    n, bs = len(prompt), runner.block_size
    request = ScheduledRequest(
        req_id, tuple(prompt), 0, tuple(range(first_block, first_block - (-n // bs))), sample=True,
        is_new=True, params=SamplingParams(temperature=0.0, max_tokens=1), prompt_len=n,
        prompt_token_ids=tuple(prompt),
    )
    runner.execute(SchedulerOutput(requests=(request,), num_scheduled_tokens=n))
    runner.execute(SchedulerOutput(requests=(), num_scheduled_tokens=0, finished_req_ids=frozenset({req_id})))
