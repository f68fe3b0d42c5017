"""tensor_parallel_size=auto: the fewest GPUs that hold the weights and a useful KV pool."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gpu_worker.config import AUTO_TENSOR_PARALLEL, EngineConfig
from gpu_worker.distributed.auto_size import choose, weight_bytes

H200 = 143771 * 2**20
LLAMA3 = dict(num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
              tie_word_embeddings=False)
LLAMA3_8B = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, **LLAMA3)
LLAMA3_70B = SimpleNamespace(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                             num_attention_heads=64, **LLAMA3)


def test_weight_bytes_match_the_published_sizes() -> None:
    assert round(weight_bytes(LLAMA3_8B, 2) / 1e9, 1) == 16.1  # 8.03 B parameters in bf16
    assert round(weight_bytes(LLAMA3_70B, 2) / 1e9) == 141  # 70.6 B parameters


def test_weight_bytes_count_every_expert_of_a_moe_model() -> None:
    mixtral = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                              num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
    assert round(weight_bytes(mixtral, 2) / 1e9, 1) == 93.4  # Mixtral-8x7B: 46.7 B parameters
    qwen3 = SimpleNamespace(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, head_dim=128,
                            num_attention_heads=32, num_key_value_heads=4, vocab_size=151936, num_experts=128,
                            num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1,
                            mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=False)
    assert round(weight_bytes(qwen3, 2) / 1e9) == 61  # Qwen3-30B-A3B: 30.5 B parameters


def test_smallest_tensor_parallel_size_that_fits() -> None:
    small = choose(LLAMA3_8B, 2, H200, 4, 0.9)
    assert (small.tensor_parallel_size, small.pipeline_parallel_size) == (1, 1)
    big = choose(LLAMA3_70B, 2, H200, 4, 0.9)
    assert (big.tensor_parallel_size, big.pipeline_parallel_size) == (2, 1)
    assert "TP=2" in big.reason and "GiB" in big.reason
    fp8 = choose(LLAMA3_70B, 1, H200, 4, 0.9)  # one byte per weight: one H200 holds it
    assert (fp8.tensor_parallel_size, fp8.pipeline_parallel_size) == (1, 1)
    with pytest.raises(ValueError, match="does not fit 1 devices"):
        choose(LLAMA3_70B, 2, H200, 1, 0.9)


def test_pipeline_stages_when_tensor_parallel_cannot_divide_the_heads() -> None:
    odd = SimpleNamespace(**{**vars(LLAMA3_70B), "num_attention_heads": 63, "num_key_value_heads": 7})
    choice = choose(odd, 2, H200, 4, 0.9)  # 63 heads: only TP=1 divides them
    assert (choice.tensor_parallel_size, choice.pipeline_parallel_size) == (1, 2)


def test_auto_in_the_config_and_the_offline_api() -> None:
    config = EngineConfig.from_kwargs("m", tensor_parallel_size="auto")
    assert config.tensor_parallel_size == AUTO_TENSOR_PARALLEL
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=-1)
