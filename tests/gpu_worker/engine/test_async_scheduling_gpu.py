"""On a GPU: async scheduling (CUDA's default) gives exactly the synchronous engine's tokens.

Both engines run the same kernels and CUDA graphs on the same batches (ignore_eos and a fixed
max_tokens leave no wasted decode that could change a batch), with the same seeded random
weights, so even bf16 results must be bitwise equal: any difference is a placeholder filled
with the wrong token or a step reading state that is not ready yet. Penalties (which wait for
the previous step's ids) and seeded random sampling are mixed in.
"""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest
import torch

from gpu_worker import LLM, SamplingParams
from gpu_worker.config import CUDA_MAX_NUM_BATCHED_TOKENS, OFFLINE_LARGE_GPU_MAX_NUM_BATCHED_TOKENS
from gpu_worker.model_executor import loader
from tests.gpu_worker.engine.engine_helpers import gpu_llama_config

pytestmark = pytest.mark.gpu


def test_async_scheduling_equals_sync_on_cuda(tmp_path: Path) -> None:
    folder = gpu_llama_config(tmp_path / "llama")
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 32000) for _ in range(rng.randrange(3, 200))] for _ in range(20)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=1.2),
        SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1),
    ] * 5
    results = []
    for async_scheduling in (False, True):
        llm = LLM(model=str(folder), load_format="dummy", gpu_memory_utilization=0.2,
                  async_scheduling=async_scheduling)
        assert llm.engine.core.async_scheduling is async_scheduling
        # The offline API's budget on this card (EngineConfig.with_device_defaults).
        large = loader.is_large_gpu(torch.device("cuda"))
        assert llm.engine.config.token_budget == (OFFLINE_LARGE_GPU_MAX_NUM_BATCHED_TOKENS if large
                                                  else CUDA_MAX_NUM_BATCHED_TOKENS)
        results.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert results[1] == results[0]
    assert [len(t) for t in results[1]] == [p.max_tokens for p in params]
