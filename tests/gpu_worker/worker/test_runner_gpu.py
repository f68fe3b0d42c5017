"""The runner on CUDA: same greedy tokens as the CPU, bf16 sampling paths, KV sizing by profiling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_worker.config import EngineConfig
from gpu_worker.model_executor import loader
from gpu_worker.model_executor.model_config import max_context_len
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.worker import kv_sizing
from gpu_worker.worker.model_runner import ModelRunner
from tests.helpers.runners import build_runner
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu


def _runner(path: Path, device: str, dtype: torch.dtype, **kw: Any) -> ModelRunner:
    return build_runner(path, device, dtype, num_kv_blocks=96, block_size=4, **kw)


def test_cuda_matches_cpu_and_samples(tmp_path: Path, driver_cls: Any, logits_spy: Any) -> None:
    path = make_tiny_model("qwen3", tmp_path / "m")
    prompts = {"a": [5, 6, 7, 8, 9], "b": list(range(100, 119)), "c": [42] * 9}
    outs = {}
    logits = {}
    for device in ("cpu", "cuda"):
        runner = _runner(path, device, torch.float32)
        spy = logits_spy(runner)
        driver = driver_cls(runner)
        for k, p in prompts.items():
            driver.add(k, p)
        driver.run(6, {"b": 7})
        outs[device] = {k: s.output for k, s in driver.seqs.items()}
        logits[device] = torch.cat([x.cpu() for x in spy])
    assert outs["cpu"] == outs["cuda"]
    torch.testing.assert_close(logits["cuda"], logits["cpu"], atol=2e-3, rtol=2e-3)

    runner = _runner(path, "cuda", torch.bfloat16)
    driver = driver_cls(runner)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=11, max_tokens=16)
    driver.add("s", prompts["a"], seeded)
    driver.add(
        "p",
        prompts["b"],
        SamplingParams(
            temperature=1.0,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            logprobs=3,
            logit_bias={7: 1.0},
            min_tokens=4,
            min_p=0.05,
        ),
    )
    driver.add("g", prompts["c"], SamplingParams(temperature=0.0, logprobs=0))
    driver.run(6)
    alone = driver_cls(_runner(path, "cuda", torch.bfloat16))
    alone.add("s", prompts["a"], seeded)
    alone.run(6)
    assert driver.seqs["s"].output == alone.seqs["s"].output
    assert all(len(lp.top) == 3 for lp in driver.logprobs["p"])
    assert all(0 <= t < 49152 for s in driver.seqs.values() for t in s.output)


def test_kv_blocks_from_gpu_memory_utilization(tmp_path: Path) -> None:
    path = make_tiny_model("llama", tmp_path / "m")
    config = EngineConfig(model=str(path), gpu_memory_utilization=0.5, max_num_batched_tokens=512)
    source = loader.resolve_model(config.model)
    hf_config = loader.load_hf_config(source)
    dev = torch.device("cuda")
    model = loader.load_model(config, dev, torch.bfloat16, source=source, hf_config=hf_config)
    config = config.with_device_defaults("cuda")
    eos = loader.eos_token_ids(source, hf_config)
    runner = ModelRunner(config, model, hf_config, dev, torch.bfloat16, eos)
    peak = runner.profile_run(max_context_len(hf_config))
    assert peak > 0 and not runner.kv_caches  # the scratch pool is gone again
    blocks = kv_sizing.num_kv_blocks(config, runner.kv_cache_spec, dev, torch.bfloat16, lambda: peak)
    total = torch.cuda.get_device_properties(dev).total_memory
    per_block = kv_sizing.kv_bytes_per_block(runner.kv_cache_spec, 16, torch.bfloat16)
    assert blocks == (int(0.5 * total) - peak) // per_block
