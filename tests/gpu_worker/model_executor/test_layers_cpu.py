"""The CPU fast paths of the model layers: per-step attention/rotary plans and the transposed
weight layout give the plain path's results (tiny random models of every family)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from helpers.tiny_models import FAMILIES, make_tiny_config
from torch import nn

from gpu_worker.model_executor.layers.attention import AttentionMetadata
from gpu_worker.model_executor.layers.linear import TransposedLinear, transpose_linears
from gpu_worker.model_executor.models.llama import head_dim_of
from gpu_worker.model_executor.models.registry import resolve_model_class
from gpu_worker.model_executor.weights import fill_random
from kernels import KernelOps, reference_ops

BLOCK = 4


def _unplanned_ops() -> KernelOps:
    return dataclasses.replace(
        reference_ops(),
        name="reference-unplanned",
        plan_paged_attention=None,
        paged_attention_with_plan=None,
        plan_rotary_embedding=None,
        rotary_embedding_with_plan=None,
    )


def _model(cfg: Any, ops: KernelOps) -> nn.Module:
    cls = resolve_model_class(cfg.architectures or [type(cfg).__name__.replace("Config", "ForCausalLM")])
    with torch.device("cpu"):
        model = cls(cfg, ops, torch.float32)  # type: ignore[call-arg]
    fill_random(model, seed=5, std=0.2)
    return model.requires_grad_(False).eval()


def _metadata(seq_lens: list[int], q_lens: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
    """Sequence ``s`` owns blocks ``10 s ..``; returns the metadata and the positions."""
    starts, slots, positions = [0], [], []
    for s, (n, q) in enumerate(zip(seq_lens, q_lens, strict=True)):
        starts.append(starts[-1] + q)
        for pos in range(n - q, n):
            positions.append(pos)
            slots.append((10 * s + pos // BLOCK) * BLOCK + pos % BLOCK)
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor(
            [[10 * s + b for b in range(10)] for s in range(len(seq_lens))], dtype=torch.int32
        ),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
    )
    return md, torch.tensor(positions)


def _run(model: nn.Module, cfg: Any, steps: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """Logits of a prefill then decode steps over fresh caches (token ids from the positions)."""
    shape = (2, 10 * len(steps[0][0]), BLOCK, cfg.num_key_value_heads, head_dim_of(cfg))
    caches = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    out = []
    with torch.inference_mode():
        for seq_lens, q_lens in steps:
            md, positions = _metadata(seq_lens, q_lens)
            ids = (positions * 7 + 3) % cfg.vocab_size
            out.append(model.compute_logits(model(ids, positions, md, caches)))  # type: ignore[operator]
    return out


STEPS = [([5, 9, 3], [5, 9, 3]), ([6, 10, 4], [1, 1, 1]), ([7, 11, 5], [1, 1, 1])]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plans_and_transposed_weights_give_the_plain_logits(family: str) -> None:
    cfg = make_tiny_config(family)
    want = _run(_model(cfg, _unplanned_ops()), cfg, STEPS)
    model = _model(cfg, reference_ops())
    torch.testing.assert_close(_run(model, cfg, STEPS), want, rtol=1e-5, atol=1e-5)
    replaced = transpose_linears(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, TransposedLinear)  # tied heads too
    assert replaced == 4 * cfg.num_hidden_layers + 1
    torch.testing.assert_close(_run(model, cfg, STEPS), want, rtol=1e-5, atol=1e-5)


def test_plans_are_built_once_per_step_and_not_copied() -> None:
    md, _ = _metadata([5, 3], [1, 1])
    calls: list[str] = []

    def build(value: str) -> str:
        calls.append(value)
        return value

    first = md.plan("x", lambda: build("built"))
    assert md.plan("x", lambda: build("again")) is first
    assert calls == ["built"]
    assert dataclasses.replace(md).plans == {}  # a new step starts without plans
    assert md == dataclasses.replace(md)  # plans take no part in equality


def test_transposed_linear_matches_nn_linear_with_bias() -> None:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(12, 7)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(7, 12, generator=gen))
        linear.bias.copy_(torch.randn(7, generator=gen))
    fast = TransposedLinear(linear.weight, linear.bias)
    for x in (
        torch.randn(1, 12, generator=gen),
        torch.randn(5, 12, generator=gen),
        torch.randn(2, 3, 12, generator=gen),
    ):
        torch.testing.assert_close(fast(x), linear(x), rtol=1e-6, atol=1e-6)
    assert fast.weight_t.shape == (12, 7) and fast.weight_t.is_contiguous()
