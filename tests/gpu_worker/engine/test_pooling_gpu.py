"""On a GPU: a pooling engine's embeddings through piecewise CUDA graphs (prefill chunks of up to
``mixed_graph_max_tokens`` replay them) equal the eager engine's, within bf16."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest
import torch

from gpu_worker import LLM
from tests.gpu_worker.engine.engine_helpers import gpu_llama_config

pytestmark = pytest.mark.gpu


def test_pooling_through_cuda_graphs_equals_eager(tmp_path: Path) -> None:
    folder = gpu_llama_config(tmp_path / "llama")
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 32000) for _ in range(rng.randrange(1, 600))] for _ in range(16)]
    results = []
    for eager in (True, False):
        llm = LLM(model=str(folder), load_format="dummy", gpu_memory_utilization=0.2, enforce_eager=eager,
                  runner="pooling", max_num_batched_tokens=512)
        results.append([torch.tensor(o.embedding) for o in llm.embed(prompts)])
        del llm
        gc.collect()
    for eager_vector, graphed_vector in zip(*results, strict=True):
        assert graphed_vector.norm().item() == pytest.approx(1.0, abs=1e-4)
        assert torch.nn.functional.cosine_similarity(eager_vector, graphed_vector, dim=0).item() > 0.999
