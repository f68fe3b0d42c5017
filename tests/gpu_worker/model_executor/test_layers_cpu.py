"""The alternative paths of the model layers: per-step attention/rotary plans, the transposed
weight layout and the fused rotary + K/V store give the plain path's results (tiny random
models of every family)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from gpu_worker.model_executor.layers.attention import PagedAttention
from gpu_worker.model_executor.layers.linear import transposed_linear
from gpu_worker.model_executor.layers.quantization.base import UnquantizedLinearMethod
from kernels import KernelOps, reference, reference_ops
from tests.gpu_worker.model_executor.tiny_model_steps import STEPS, build_model, run_steps, step_metadata
from tests.helpers.tiny_models import FAMILIES, make_tiny_config


def _unplanned_ops() -> KernelOps:
    return dataclasses.replace(
        reference_ops(),
        name="reference-unplanned",
        plan_paged_attention=None,
        paged_attention_with_plan=None,
        plan_rotary_embedding=None,
        rotary_embedding_with_plan=None,
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plans_and_transposed_weights_give_the_plain_logits(family: str) -> None:
    cfg = make_tiny_config(family)
    want = run_steps(build_model(cfg, _unplanned_ops()), cfg, STEPS)
    model = build_model(cfg, reference_ops())
    torch.testing.assert_close(run_steps(model, cfg, STEPS), want, rtol=1e-5, atol=1e-5)
    transposed = UnquantizedLinearMethod(transposed=True)
    linears = [m for m in model.modules() if hasattr(m, "linear_method")]
    for module in linears:
        module.linear_method = transposed
        transposed.process_weights_after_loading(module)
    assert len(linears) == 4 * cfg.num_hidden_layers + 1  # tied heads too
    assert all(hasattr(m, "weight_t") and "weight" not in m._parameters for m in linears)
    torch.testing.assert_close(run_steps(model, cfg, STEPS), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fused_rotary_store_gives_the_plain_logits(family: str) -> None:
    """With ``rotary_store_kvcache`` a layer rotates and stores in one call, then only attends:
    the reference fused op composes the same two ops, so the logits are bitwise the plain ones."""
    cfg = make_tiny_config(family)
    calls: list[int] = []

    def fused(*args: torch.Tensor) -> torch.Tensor:
        calls.append(args[1].shape[0])  # tokens of this call's q
        return reference.rotary_store_kvcache(*args)

    plain = _unplanned_ops()
    want = run_steps(build_model(cfg, plain), cfg, STEPS)
    ops = dataclasses.replace(plain, name="reference-fused", rotary_store_kvcache=fused)
    torch.testing.assert_close(run_steps(build_model(cfg, ops), cfg, STEPS), want, rtol=0, atol=0)
    tokens_per_step = [sum(q_lens) for _, q_lens in STEPS]
    assert calls == [n for n in tokens_per_step for _ in range(cfg.num_hidden_layers)]


def test_fused_store_never_pairs_with_planned_attention() -> None:
    with pytest.raises(ValueError, match="store K/V"):
        dataclasses.replace(reference_ops(), rotary_store_kvcache=reference.rotary_store_kvcache)
    attn = PagedAttention(4, 2, 8, 1.0, reference_ops())
    md, _ = step_metadata([5], [1])
    with pytest.raises(RuntimeError, match="call forward"):
        attn.attend(torch.ones(1, 4, 8), torch.ones(2, 10, 4, 2, 8), md)


def test_plans_are_built_once_per_step_and_not_copied() -> None:
    md, _ = step_metadata([5, 3], [1, 1])
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
    weight_t = linear.weight.detach().t().contiguous()
    for x in (
        torch.randn(1, 12, generator=gen),
        torch.randn(5, 12, generator=gen),
        torch.randn(2, 3, 12, generator=gen),
    ):
        want = linear(x)
        torch.testing.assert_close(transposed_linear(x, weight_t, linear.bias), want, rtol=1e-6, atol=1e-6)
        no_bias = transposed_linear(x, weight_t, None)
        torch.testing.assert_close(no_bias, want - linear.bias, rtol=1e-5, atol=1e-5)
