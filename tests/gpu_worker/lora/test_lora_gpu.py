"""On a GPU: LoRA through the Triton kernels and CUDA graphs. A batch mixing the base model and
two adapters gives, in float32, the same greedy tokens through decode and piecewise CUDA graphs
as the eager engine, and each adapter changes the output (random weights, ``load_format``
dummy: the adapters are drawn for the same shapes)."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest

from gpu_worker import LLM, SamplingParams
from tests.gpu_worker.engine.engine_helpers import gpu_llama_config
from tests.helpers.lora_adapters import write_random_adapter

pytestmark = pytest.mark.gpu


def test_lora_through_cuda_graphs_equals_eager(tmp_path: Path) -> None:
    folder = gpu_llama_config(tmp_path / "llama")
    full = write_random_adapter(folder, tmp_path / "full", rank=16, seed=1, std=0.02)
    qv = write_random_adapter(folder, tmp_path / "qv", rank=8, targets=("q_proj", "v_proj"), seed=2, std=0.02)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 32000) for _ in range(rng.randrange(1, 300))] for _ in range(12)]
    names = [None, "full", "qv"] * 4
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    results = []
    for eager in (True, False):
        llm = LLM(model=str(folder), load_format="dummy", dtype="float32", gpu_memory_utilization=0.3,
                  enforce_eager=eager, skip_tokenizer_init=True, max_num_batched_tokens=512,
                  lora_modules=f"full={full},qv={qv}", max_lora_rank=16)
        outputs = llm.generate(prompts + prompts[:3], params, lora_request=names + [None, None, None])
        results.append([list(o.outputs[0].token_ids) for o in outputs])
        del llm
        gc.collect()
    eager, graphed = results
    assert graphed == eager
    # the same prompts without their adapters (the last three ran prompts 0..2 on the base model)
    assert eager[1] != eager[13] and eager[2] != eager[14]
