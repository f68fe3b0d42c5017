"""fp8 KV scales computed from data (``calculate_kv_scales``, on by default) on the CPU.

Where the checkpoint has no ``k_scale``/``v_scale``, the runner's first real step computes each
layer's (per tensor) as ``amax(|x|) / 200`` for K and ``/ 100`` for V (vLLM's constants) from
the K/V it stores, then they stay frozen. Profile and warm-up steps never set them; a
checkpoint's scales are kept; a draft model's runner computes its own.

Accuracy (asserted with margin; measured numbers in docs/QUANTIZATION.md): on a tiny random
llama whose K/V are deliberately small (k_proj/v_proj weights times 1e-3, |K|, |V| < 2^-6, e4m3's
smallest normal, so scale 1.0 stores them as subnormals or zeros), computed scales give logits
far closer to the 16-bit cache's than scale 1.0.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_worker import LLM, SamplingParams
from gpu_worker.model_executor.layers.attention import (
    KV_SCALE_DIVISORS,
    KV_SCALE_MIN_AMAX,
    PagedAttention,
    param_of,
)
from gpu_worker.model_executor.weights import TensorSource
from gpu_worker.worker.model_runner import ModelRunner
from kernels import reference_ops
from tests.helpers.quantized_checkpoints import _read, write_dense_checkpoint, write_fp8_checkpoint
from tests.helpers.runners import build_runner, prefill_step
from tests.helpers.smollm2_accuracy import sequence_logits

PROMPT_A = [(7 * j) % 1500 + 40 for j in range(21)]
PROMPT_B = [(11 * j + 5) % 1800 + 30 for j in range(37)]


def attention_layers(runner: ModelRunner) -> list[PagedAttention]:
    return [m for m in runner.model.modules() if isinstance(m, PagedAttention)]


def scales(runner: ModelRunner) -> list[tuple[float, float]]:
    return [(float(a.k_scale), float(a.v_scale)) for a in attention_layers(runner)]


def capture_kv(runner: ModelRunner) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Callable[[], None]]:
    """The K/V ``[T, Hk, D]`` each attention layer is given (after rotary), per forward; and a
    function that removes the hooks."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        seen.append((args[1].clone(), args[2].clone()))

    handles = [a.register_forward_pre_hook(hook) for a in attention_layers(runner)]
    return seen, lambda: [h.remove() for h in handles]  # type: ignore[func-returns-value]


def expected_scale(x: torch.Tensor, name: str) -> torch.Tensor:
    amax = x.abs().amax().float().clamp_min(KV_SCALE_MIN_AMAX)
    return torch.div(amax, torch.full_like(amax, KV_SCALE_DIVISORS[name])).reshape(1)


def test_first_real_prefill_computes_the_scales_and_they_stay_frozen(
    tiny_model: Callable[[str], Path],
) -> None:
    runner = build_runner(tiny_model("llama"), kv_cache_dtype="fp8", num_kv_blocks=16,
                          max_num_batched_tokens=64)
    # Profile and warm-up steps (dummy tokens on scratch slots) leave them alone.
    runner.profile_run(64)
    runner.initialize_kv_cache(16, 256)
    runner.warmup()
    assert runner.kv_scales.pending
    assert scales(runner) == [(1.0, 1.0)] * 2
    default = {"k_scale": "default", "v_scale": "default"}
    assert all(a.scale_sources == default for a in attention_layers(runner))
    buffers = [(a.k_scale.data_ptr(), a.v_scale.data_ptr()) for a in attention_layers(runner)]

    seen, remove = capture_kv(runner)
    prefill_step(runner, "a", PROMPT_A)
    remove()
    assert not runner.kv_scales.pending
    for attn, (k, v) in zip(attention_layers(runner), seen, strict=True):
        assert torch.equal(attn.k_scale, expected_scale(k, "k_scale"))
        assert torch.equal(attn.v_scale, expected_scale(v, "v_scale"))
        assert attn.scale_sources == {"k_scale": "computed", "v_scale": "computed"}
        assert not attn.calibrate
    # Updated in place: decode CUDA graphs captured at warm-up read these very buffers.
    assert [(a.k_scale.data_ptr(), a.v_scale.data_ptr()) for a in attention_layers(runner)] == buffers

    # Against a 16-bit cache's forward of the same prompt: layer 0 sees the same K/V exactly,
    # layer 1 the K/V of an input that went through layer 0's fp8 attention.
    ref = build_runner(tiny_model("llama"), num_kv_blocks=16)
    ref_seen, remove = capture_kv(ref)
    prefill_step(ref, "a", PROMPT_A)
    remove()
    for i, (attn, (k, v)) in enumerate(zip(attention_layers(runner), ref_seen, strict=True)):
        rtol = 0 if i == 0 else 0.05
        torch.testing.assert_close(attn.k_scale, expected_scale(k, "k_scale"), rtol=rtol, atol=0)
        torch.testing.assert_close(attn.v_scale, expected_scale(v, "v_scale"), rtol=rtol, atol=0)

    # Frozen: a later prompt with other K/V changes nothing.
    computed = scales(runner)
    prefill_step(runner, "b", [t * 3 % 2000 + 1 for t in PROMPT_B], first_block=4)
    assert scales(runner) == computed


def test_calculate_kv_scales_off_keeps_1_and_16_bit_cache_never_calibrates(
    tiny_model: Callable[[str], Path],
) -> None:
    off = build_runner(tiny_model("llama"), kv_cache_dtype="fp8", calculate_kv_scales=False, num_kv_blocks=16)
    sixteen = build_runner(tiny_model("llama"), num_kv_blocks=16)
    for runner in (off, sixteen):
        assert not runner.kv_scales.pending
        prefill_step(runner, "a", PROMPT_A)
        assert scales(runner) == [(1.0, 1.0)] * 2
    assert off.kv_scales.describe() == "1.0 (calculate_kv_scales off)"


def test_checkpoint_scales_are_kept(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    folder = tmp_path / "fp8-kv"
    write_fp8_checkpoint(tiny_model("llama"), folder, kv_scales=(0.05, 0.02))
    runner = build_runner(folder, kv_cache_dtype="fp8", num_kv_blocks=16)
    assert not runner.kv_scales.pending and runner.kv_scales.describe() == "checkpoint"
    prefill_step(runner, "a", PROMPT_A)
    assert [x for pair in scales(runner) for x in pair] == pytest.approx([0.05, 0.02] * 2)
    # A checkpoint with only k_scale: v_scale is computed, k_scale kept.
    attn = PagedAttention(4, 2, 8, 1.0, reference_ops())
    attn.load("k_scale", TensorSource.of(torch.tensor([0.25, 0.5])))  # per KV head
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([0, 1, 2, 3, -1])  # the padding token's V is excluded
    v[4] = 1000.0
    attn.calibrate = True
    attn.calibrate_kv_scales(k, v, slots)
    assert attn.k_scale.tolist() == [0.25, 0.5] and not attn.calibrate
    assert torch.equal(attn.v_scale, expected_scale(v[:4], "v_scale"))
    assert attn.scale_sources == {"k_scale": "checkpoint", "v_scale": "computed"}


def test_all_zero_kv_gets_a_finite_positive_scale() -> None:
    attn = PagedAttention(2, 1, 4, 1.0, reference_ops())
    attn.calibrate_kv_scales(torch.zeros(3, 1, 4), torch.zeros(3, 1, 4), torch.arange(3))
    for name in ("k_scale", "v_scale"):
        value = float(param_of(attn, name))
        assert value == pytest.approx(KV_SCALE_MIN_AMAX / KV_SCALE_DIVISORS[name]) and value > 0
        assert torch.isfinite(1 / param_of(attn, name)).all()


def test_engine_target_and_draft_compute_their_own_scales(tiny_model: Callable[[str], Path]) -> None:
    spec = {"method": "draft_model", "model": str(tiny_model("qwen2")), "num_speculative_tokens": 2}
    with LLM(model=str(tiny_model("llama")), kv_cache_dtype="fp8", speculative_config=spec,
             skip_tokenizer_init=True, num_kv_blocks=16, max_model_len=128) as llm:
        core = llm.engine.core
        assert core.runner.kv_scales.pending and core.draft_runner.kv_scales.pending
        llm.generate([PROMPT_A], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        for runner in (core.runner, core.draft_runner):
            assert not runner.kv_scales.pending and runner.kv_scales.describe() == "computed"
            assert all(k != 1.0 and v != 1.0 for k, v in scales(runner))
        assert scales(core.runner) != scales(core.draft_runner)


def small_kv_model(tiny: Path, dst: Path, factor: float) -> Path:
    """``tiny`` with its k_proj/v_proj weights times ``factor``."""
    weights = {n: t.float() * factor for n, t in _read(tiny).items()
               if n.endswith(("k_proj.weight", "v_proj.weight"))}
    return write_dense_checkpoint(tiny, dst, weights)


def test_computed_scales_beat_1_0_on_small_kv(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    folder = small_kv_model(tiny_model("llama"), tmp_path / "small-kv", 1e-3)
    base = build_runner(folder, num_kv_blocks=16)
    one = build_runner(folder, kv_cache_dtype="fp8", calculate_kv_scales=False, num_kv_blocks=16)
    computed = build_runner(folder, kv_cache_dtype="fp8", num_kv_blocks=16)
    seen, remove = capture_kv(base)
    prefill_step(base, "a", PROMPT_A)
    remove()
    amax = max(float(x.abs().max()) for kv in seen for x in kv)
    assert amax < 2**-6  # every K/V is below e4m3's smallest normal at scale 1.0
    prefill_step(computed, "a", PROMPT_A)  # calibrates on prompt A; measured on prompt B
    reference = sequence_logits(base, PROMPT_B)
    err_one = (sequence_logits(one, PROMPT_B) - reference).abs()
    err_computed = (sequence_logits(computed, PROMPT_B) - reference).abs()
    print(f"small K/V (amax {amax:.2e}): logits vs 16-bit cache, max abs error scale 1.0 "
          f"{err_one.max():.3e} (mean {err_one.mean():.3e}), computed {err_computed.max():.3e} "
          f"(mean {err_computed.mean():.3e}), |logit| max {reference.abs().max():.3f}")
    assert float(err_computed.max()) * 10 < float(err_one.max())
    assert float(err_computed.mean()) * 10 < float(err_one.mean())



@pytest.mark.gpu
def test_cuda_graph_decode_reads_the_computed_scales(tmp_path: Path) -> None:
    """On the card: the first real step runs eagerly (unfused rotary + store, since it calibrates),
    then decode steps replay graphs captured at warm-up, when the scales were 1.0; they read the
    computed ones (updated in place), so greedy tokens equal the eager engine's."""
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        pytest.skip("an fp8 KV cache needs compute capability >= 8.9")
    from tests.helpers.tiny_models import make_tiny_model

    folder = make_tiny_model("llama", tmp_path / "dense", hidden_size=256, intermediate_size=512)
    prompts = [[(5 * i + 3 * j) % 2000 + 30 for j in range(5 + 13 * i)] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    results = []
    for eager in (False, True):
        with LLM(model=str(folder), kv_cache_dtype="fp8", enforce_eager=eager, skip_tokenizer_init=True,
                 num_kv_blocks=64, max_num_seqs=8) as llm:
            runner = llm.engine.core.runner
            assert runner.kv_scales.pending and (runner.graphs is None) == eager
            tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
            assert runner.kv_scales.describe() == "computed"
            results.append((tokens, scales(runner)))
    assert results[0] == results[1]
    assert all(k != 1.0 and v != 1.0 for k, v in results[0][1])
