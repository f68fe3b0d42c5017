"""KV pool sizing and the runner's dummy steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_worker.config import EngineConfig
from gpu_worker.model_executor.model_config import KVCacheSpec, head_dim_of
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.worker import kv_sizing
from tests.helpers.tiny_models import make_tiny_config

CPU = torch.device("cpu")


def spec_of(family: str) -> KVCacheSpec:
    """One rank's KV caches for the whole tiny model (the shape the loaded model reports)."""
    cfg = make_tiny_config(family)
    return KVCacheSpec(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim_of(cfg))


def test_bytes_per_block_follow_the_model_shape() -> None:
    cfg = spec_of("qwen3")  # 2 layers, 2 KV heads, head_dim 32
    assert kv_sizing.kv_bytes_per_block(cfg, 16, torch.float32) == 2 * 2 * 2 * 32 * 4 * 16
    assert kv_sizing.kv_bytes_per_block(cfg, 16, torch.bfloat16) == 2 * 2 * 2 * 32 * 2 * 16
    half = KVCacheSpec(cfg.num_layers, 1, cfg.head_dim)  # a TP=2 rank holds one of the 2 KV heads
    assert kv_sizing.kv_bytes_per_block(half, 16, torch.float32) == kv_sizing.kv_bytes_per_block(
        cfg, 16, torch.float32) // 2


def test_number_of_blocks_precedence() -> None:
    cfg = spec_of("llama")  # head_dim 16: 4096 bytes per 16-token float32 block
    per_block = kv_sizing.kv_bytes_per_block(cfg, 16, torch.float32)
    assert (
        kv_sizing.num_kv_blocks(
            EngineConfig(num_kv_blocks=7, kv_cache_memory_bytes=10**9), cfg, CPU, torch.float32
        )
        == 7
    )
    budget = EngineConfig(kv_cache_memory_bytes=100 * per_block + 5)
    assert kv_sizing.num_kv_blocks(budget, cfg, CPU, torch.float32) == 100
    assert kv_sizing.num_kv_blocks(EngineConfig(), cfg, CPU, torch.float32) == (512 << 20) // per_block
    with pytest.raises(ValueError, match="holds no block"):
        kv_sizing.num_kv_blocks(EngineConfig(kv_cache_memory_bytes=10), cfg, CPU, torch.float32)


def test_profile_run_and_warmup_leave_no_state(
    tiny_model: Callable[[str], Path], runner_factory: Any, driver_cls: Any
) -> None:
    runner = runner_factory(tiny_model("llama"), max_num_batched_tokens=64, max_num_seqs=8)
    num_blocks, max_model_len = runner.num_kv_blocks, runner.max_model_len
    assert runner.profile_run(max_model_len) == 0  # CPU: no device peak to report
    assert not runner.kv_caches and runner.num_kv_blocks == 0  # profiling runs before the pool exists
    runner.initialize_kv_cache(num_blocks, max_model_len)
    runner.warmup()
    assert runner.num_requests == 0
    # The runner still serves correctly afterwards, seeded rows included.
    driver = driver_cls(runner)
    driver.add("s", [5, 6, 7], SamplingParams(temperature=1.0, seed=3, max_tokens=8))
    driver.add("g", [9, 10], SamplingParams(temperature=0.0, max_tokens=8))
    driver.run(5)
    alone = driver_cls(runner_factory(tiny_model("llama")))
    alone.add("s", [5, 6, 7], SamplingParams(temperature=1.0, seed=3, max_tokens=8))
    alone.run(5)
    assert driver.seqs["s"].output == alone.seqs["s"].output
    assert len(driver.seqs["g"].output) == 5
