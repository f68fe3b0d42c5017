"""Multi-LoRA serving in the engine: a request with an adapter generates, greedy and in float32
on the CPU, exactly what HF transformers generates with that adapter merged into the weights,
token for token, for every family; a batch mixing the base model and two adapters equals each
alone; an adapter's prefix-cache blocks never serve another adapter or the base model; chunked
prefill and tensor parallelism (gloo) change nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu_worker import LLM, LoRARequest, SamplingParams
from tests.gpu_worker.engine.engine_helpers import hf_greedy
from tests.helpers.lora_adapters import merged_model, write_random_adapter

PROMPTS = [[(13 * i + 5 * j) % 3000 + 11 for j in range(6 + 11 * i)] for i in range(3)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
             ) -> Callable[[str], tuple[Path, Path]]:
    """Two random adapters per family: all projections at rank 8, and q/v only at rank 4."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            model = tiny_model(family)
            root = tmp_path_factory.mktemp(f"lora-{family}")
            full = write_random_adapter(model, root / "full", rank=8, seed=1)
            qv = write_random_adapter(model, root / "qv", rank=4, targets=("q_proj", "v_proj"), seed=2,
                                      alpha=8.0, use_rslora=True)
            made[family] = (full, qv)
        return made[family]

    return get


def _expected(model_dir: Path, adapter: Path | None, hf_model: Callable[[Path], Any]) -> list[list[int]]:
    reference = hf_model(model_dir) if adapter is None else merged_model(model_dir, adapter)
    return [hf_greedy(reference, p, GREEDY.max_tokens) for p in PROMPTS]


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2", "mistral"])
def test_adapters_match_hf_merged_weights_in_a_mixed_batch(
        family: str, tiny_model: Callable[[str], Path], hf_model: Callable[[Path], Any],
        adapters: Callable[[str], tuple[Path, Path]]) -> None:
    model_dir = tiny_model(family)
    full, qv = adapters(family)
    want = {None: _expected(model_dir, None, hf_model), "full": _expected(model_dir, full, hf_model),
            "qv": _expected(model_dir, qv, hf_model)}
    assert want["full"] != want[None] and want["qv"] != want[None]  # the adapters matter
    # a 16-token budget chunks the longer prompts
    with LLM(model=str(model_dir), skip_tokenizer_init=True, num_kv_blocks=128, max_num_batched_tokens=16,
             lora_modules=f"full={full},qv={qv}") as llm:
        names: list[str | None] = [None, "full", "qv"] * len(PROMPTS)
        prompts = [p for p in PROMPTS for _ in range(3)]
        outputs = llm.generate(prompts, GREEDY, lora_request=names)
        for i, output in enumerate(outputs):
            assert list(output.outputs[0].token_ids) == want[names[i]][i // 3], (names[i], i)
        # again, alone and warm: the adapters' blocks are their own (cached tokens, same outputs)
        again = llm.generate(PROMPTS[2:], GREEDY, lora_request=LoRARequest("qv", 1, str(qv)))
        assert again[0].num_cached_tokens >= 16
        assert list(again[0].outputs[0].token_ids) == want["qv"][2]
        base = llm.generate(PROMPTS[2:], GREEDY)
        assert list(base[0].outputs[0].token_ids) == want[None][2]
        stats = llm.engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks


def test_unknown_adapters_are_refused(tiny_model: Callable[[str], Path],
                                      adapters: Callable[[str], tuple[Path, Path]]) -> None:
    full, _ = adapters("llama")
    with LLM(model=str(tiny_model("llama")), skip_tokenizer_init=True, num_kv_blocks=32,
             lora_modules=f"full={full}") as llm:
        with pytest.raises(ValueError, match="not served"):
            llm.generate(PROMPTS[:1], GREEDY, lora_request="other")
        with pytest.raises(ValueError, match="was loaded from"):
            llm.generate(PROMPTS[:1], GREEDY, lora_request=LoRARequest("full", 1, "/elsewhere"))


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_sharded_adapters_match_hf(tp: int, pp: int, tiny_model: Callable[[str], Path],
                                   hf_model: Callable[[Path], Any],
                                   adapters: Callable[[str], tuple[Path, Path]]) -> None:
    """Tensor parallelism shards the adapters as it shards the weights (B's rows of a
    column-parallel layer, A's columns of a row-parallel one, summed by its all-reduce);
    pipeline stages hold their layers' adapters."""
    model_dir = tiny_model("qwen3")
    full, qv = adapters("qwen3")
    with LLM(model=str(model_dir), skip_tokenizer_init=True, num_kv_blocks=64, max_num_batched_tokens=16,
             tensor_parallel_size=tp, pipeline_parallel_size=pp, lora_modules=f"full={full},qv={qv}") as llm:
        outputs = llm.generate(PROMPTS, GREEDY, lora_request=["full", "qv", None])
    for output, adapter, prompt in zip(outputs, [full, qv, None], PROMPTS, strict=True):
        reference = hf_model(model_dir) if adapter is None else merged_model(model_dir, adapter)
        assert list(output.outputs[0].token_ids) == hf_greedy(reference, prompt, GREEDY.max_tokens)
