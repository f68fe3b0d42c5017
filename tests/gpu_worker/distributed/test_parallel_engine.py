"""Tensor and pipeline parallelism on the CPU (gloo): every family's greedy tokens with TP=2,
PP=2 and TP=2 x PP=2 equal one rank's, through chunked prefill, a preemption and a prefix-cache
hit; TP=4 replicates the KV heads (the tiny models have 2)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_worker import LLM, SamplingParams
from tests.helpers.tiny_models import FAMILIES

# The first prompt alone, then all four: its cached blocks are hit at admission; a pool of 12
# blocks (192 tokens) for four 40-token prompts that grow by 24: preemption; a 24-token budget
# per step: chunked prefill.
ENGINE = dict(
    skip_tokenizer_init=True, num_kv_blocks=12, max_num_seqs=4, max_num_batched_tokens=24,
    max_model_len=160, enforce_eager=True,
)
PROMPTS = [[(7 * i + 13 * j) % 4000 + 10 for j in range(40)] for i in range(4)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def run(model: Path, tp: int, pp: int) -> tuple[list[list[int]], dict[str, int]]:
    with LLM(model=str(model), tensor_parallel_size=tp, pipeline_parallel_size=pp, **ENGINE) as llm:
        first = llm.generate(PROMPTS[:1], PARAMS)
        outs = llm.generate(PROMPTS, PARAMS)
        tokens = [list(o.outputs[0].token_ids) for o in [*first, *outs]]
        stats = llm.engine.stats()
        return tokens, {"preemptions": stats.num_preemptions, "cached": outs[0].num_cached_tokens}


@pytest.fixture(scope="module")
def reference(tiny_model: Callable[[str], Path]) -> Iterator[Callable[[str], list[list[int]]]]:
    """One rank's tokens per family (computed once), after checking the scenario really
    preempts and hits the prefix cache."""
    cache: dict[str, list[list[int]]] = {}

    def get(family: str) -> list[list[int]]:
        if family not in cache:
            tokens, seen = run(tiny_model(family), 1, 1)
            assert seen["preemptions"] > 0 and seen["cached"] >= 32, seen
            cache[family] = tokens
        return cache[family]

    yield get


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sharded_greedy_equals_one_rank(
    tiny_model: Callable[[str], Path],
    reference: Callable[[str], list[list[int]]],
    family: str,
    tp: int,
    pp: int,
) -> None:
    tokens, seen = run(tiny_model(family), tp, pp)
    assert seen["preemptions"] > 0 and seen["cached"] >= 32, seen
    assert tokens == reference(family)


def test_more_ranks_than_kv_heads_replicates_them(
    tiny_model: Callable[[str], Path], reference: Callable[[str], list[list[int]]]
) -> None:
    tokens, _ = run(tiny_model("qwen3"), 4, 1)  # 4 query heads, 2 KV heads: each KV head on 2 ranks
    assert tokens == reference("qwen3")


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_sharded_prompt_logprobs_equal_one_ranks(tiny_model: Callable[[str], Path], tp: int, pp: int) -> None:
    """The LM head's gather over the prompt positions (TP), and the sampling stage sending them
    to the driver (PP), through chunked prefill."""
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)

    def prompt_logprobs(tp: int, pp: int) -> list[Any]:
        with LLM(model=str(tiny_model("llama")), tensor_parallel_size=tp, pipeline_parallel_size=pp,
                 **ENGINE) as llm:
            return [o.prompt_logprobs for o in llm.generate(PROMPTS[:2], params)]

    one, sharded = prompt_logprobs(1, 1), prompt_logprobs(tp, pp)
    for want, got, prompt in zip(one, sharded, PROMPTS[:2], strict=True):
        assert want is not None and got is not None and len(got) == len(want) == len(prompt)
        assert got[0] is None
        for pos in range(1, len(prompt)):
            token = prompt[pos]
            assert got[pos][token].logprob == pytest.approx(want[pos][token].logprob, abs=1e-4)
            assert sorted(got[pos]) == sorted(want[pos])
