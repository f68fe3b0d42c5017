"""Accuracy of the quantized paths on a real model, SmolLM2-135M-Instruct (its Q4_1 GGUF), CPU.

Three model builds (unquantized, fp8, the GGUF served quantized; the fp8-emulated weights are
the unquantized model's, rounded in place). The unquantized model is the GGUF's weights
dequantized, in float32; the text and prompts are in
``tests/helpers/smollm2_accuracy.py``. Measured values (printed with ``-s``) are in
docs/QUANTIZATION.md.

- fp8-emulated weights (each projection quantized per output channel and dequantized with the
  GPU path's rounding, ``fp8_format.fp8_emulated_weight``): perplexity on :data:`TEXT` within
  3% (measured +2.1%).
- the engine's fp8 path as the GPU runs it (``quantization="fp8"``: W8A8, the activations also
  quantized per token): within 6% (measured +4.6% when written, +2.8% on 2026-12-05). Its greedy
  argmax given the text so far equals the unquantized model's at 90% of the positions or more
  (measured 91.6%, then 92.9%).
- block-wise fp8 (DeepSeek-style, DECISIONS 145) emulated on the unquantized model, blocks of
  64 x 64 (SmolLM2's 576 / 192 / 1,536 rows and inputs are whole blocks of 64, not of 128):
  weights alone (each projection through ``quantize_fp8_blocks`` / ``dequantize_fp8_blocks``)
  within 3%, and as the GPU path computes a prompt (W8A8: each projection's input also quantized
  per token in groups of 64) within 6%; both printed beside per-channel fp8's.
- the GGUF served quantized (``quantization="gguf"``: its tensors repacked into 4-bit / 8-bit
  WnA16 layers) against HF transformers over the weights transformers dequantizes from that
  file: perplexity within 1% (measured: equal to 5 digits).
- greedy continuations of :data:`GREEDY_PROMPTS` (8 prompts, 16 tokens; a batched prefill then
  decode steps over the paged KV cache, ``greedy_continuations``): the GGUF served
  quantized gives all 8 exactly as the unquantized model. With fp8 weights the first token
  agrees for at least 6 of 8 (measured 7), but the whole 16 tokens for none of the 8: this
  135M model's greedy choices are close calls that e4m3's 3-bit mantissa tips (weights alone
  keep 2 of 8; rounding the weights to bf16 keeps 8 of 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_worker.model_executor import loader
from gpu_worker.model_executor.layers.quantization.base import UnquantizedLinearMethod
from gpu_worker.model_executor.layers.quantization.fp8 import Fp8LinearMethod
from gpu_worker.model_executor.layers.quantization.fp8_format import fp8_emulated_weight
from gpu_worker.model_executor.layers.quantization.wna16 import WnA16LinearMethod
from gpu_worker.worker.model_runner import ModelRunner
from kernels.quant_reference import dequantize_fp8_blocks, quantize_fp8_blocks, quantize_fp8_per_token_group
from tests.helpers.runners import build_runner
from tests.helpers.smollm2_accuracy import GREEDY_PROMPTS, greedy_continuations, perplexity, sequence_logits
from tests.helpers.smollm2_accuracy import text_ids as tokenize_text

MAX_TOKENS = 16
METHODS = {"none": UnquantizedLinearMethod, "fp8": Fp8LinearMethod, "gguf": WnA16LinearMethod}


@pytest.fixture(scope="module")
def text_ids(smollm2_tokenizer: Any) -> list[int]:
    return tokenize_text(smollm2_tokenizer)


BLOCK = (64, 64)  # block-wise fp8 emulation: SmolLM2's dimensions are whole 64-blocks


def projections(runner: ModelRunner) -> list[torch.nn.Module]:
    """The linear layers with weights of their own, the LM head excepted (CPU layout ``[in, out]``)."""
    return [m for name, m in runner.model.named_modules() if hasattr(m, "weight_t") and name != "lm_head"]


def emulate_fp8_weights(runner: ModelRunner) -> None:
    """Each projection (not the LM head) replaced by its fp8 round trip (CPU layout ``[in, out]``)."""
    for module in projections(runner):
        with torch.no_grad():
            module.weight_t.copy_(fp8_emulated_weight(module.weight_t.t().contiguous()).t())


def emulate_block_fp8_weights(runner: ModelRunner, originals: list[torch.Tensor]) -> None:
    """Each projection set to its ``originals`` weight (``[in, out]``) after a block-wise fp8 round trip."""
    for module, w in zip(projections(runner), originals, strict=True):
        q, scale = quantize_fp8_blocks(w.t().contiguous(), BLOCK)
        with torch.no_grad():
            module.weight_t.copy_(dequantize_fp8_blocks(q, scale, BLOCK).t())


def quantize_inputs_per_group(runner: ModelRunner) -> list[Any]:
    """Forward pre-hooks that hand each projection its input quantized per token in groups of
    ``BLOCK[1]`` and dequantized (block-wise W8A8's activations); returns the hook handles."""

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        x = args[0]
        q, scale = quantize_fp8_per_token_group(x.reshape(-1, x.shape[-1]), BLOCK[1])
        deq = q.float().reshape(q.shape[0], -1, BLOCK[1]) * scale[:, :, None]
        return (deq.reshape(x.shape).to(x.dtype),)

    return [m.register_forward_pre_hook(hook) for m in projections(runner)]


@dataclass(frozen=True)
class Measured:
    """Per variant: logits over TEXT and greedy continuations of GREEDY_PROMPTS."""

    logits: dict[str, torch.Tensor]
    greedy: dict[str, list[list[int]]]


@pytest.fixture(scope="module")
def measured(
    smollm2_gguf: Path, gguf_cache_dir: Path, text_ids: list[int], smollm2_tokenizer: Any
) -> Measured:
    """Unquantized, fp8-emulated weights (the unquantized runner, its projections then rounded
    in place), the fp8 path (W8A8), the GGUF served quantized: three model builds."""
    prompts = [smollm2_tokenizer(p)["input_ids"] for p in GREEDY_PROMPTS]
    logits: dict[str, torch.Tensor] = {}
    greedy: dict[str, list[list[int]]] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMSERVE_CACHE_DIR", str(gguf_cache_dir))
        for quantization in ("none", "fp8", "gguf"):
            runner = build_runner(smollm2_gguf, num_kv_blocks=32, quantization=quantization)
            method = runner.model.model.layers[0].mlp.down_proj.linear_method  # type: ignore[union-attr]
            assert isinstance(method, METHODS[quantization])
            names: tuple[str, ...] = (quantization,)
            if quantization == "none":
                names = ("none", "fp8-weights", "fp8-block-weights", "fp8-block-w8a8")
                originals = [m.weight_t.detach().clone() for m in projections(runner)]
            for name in names:
                if name == "fp8-weights":
                    emulate_fp8_weights(runner)
                elif name == "fp8-block-weights":
                    emulate_block_fp8_weights(runner, originals)
                elif name == "fp8-block-w8a8":
                    quantize_inputs_per_group(runner)
                logits[name] = sequence_logits(runner, text_ids)
                if name == "none" or name == quantization:  # fp8 weights alone: 2/8 once (docs)
                    greedy[name] = greedy_continuations(runner, prompts, MAX_TOKENS)
    return Measured(logits, greedy)


def test_fp8_emulated_weights_perplexity_within_3_percent(measured: Measured, text_ids: list[int]) -> None:
    logits = measured.logits
    base, emulated = perplexity(logits["none"], text_ids), perplexity(logits["fp8-weights"], text_ids)
    print(f"perplexity: unquantized {base:.4f}, fp8-emulated weights {emulated:.4f} "
          f"({emulated / base - 1:+.2%})")
    assert abs(emulated / base - 1) < 0.03


def test_block_fp8_emulated_perplexity(measured: Measured, text_ids: list[int]) -> None:
    """Block-wise fp8 (64 x 64), weights alone within 3% and W8A8 (inputs per token group of 64)
    within 6% of the unquantized perplexity, as per-channel fp8's bounds."""
    logits = measured.logits
    base = perplexity(logits["none"], text_ids)
    weights = perplexity(logits["fp8-block-weights"], text_ids)
    w8a8 = perplexity(logits["fp8-block-w8a8"], text_ids)
    agree = float((logits["fp8-block-w8a8"].argmax(-1) == logits["none"].argmax(-1)).float().mean())
    print(f"perplexity: unquantized {base:.4f}, fp8 64x64 blocks weights {weights:.4f} "
          f"({weights / base - 1:+.2%}), W8A8 per token group {w8a8:.4f} ({w8a8 / base - 1:+.2%}); "
          f"top-1 agreement {agree:.1%}")
    assert abs(weights / base - 1) < 0.03
    assert abs(w8a8 / base - 1) < 0.06


def test_fp8_w8a8_perplexity_and_top1_agreement(measured: Measured, text_ids: list[int]) -> None:
    logits = measured.logits
    base, fp8 = perplexity(logits["none"], text_ids), perplexity(logits["fp8"], text_ids)
    agree = float((logits["fp8"].argmax(-1) == logits["none"].argmax(-1)).float().mean())
    print(f"perplexity: unquantized {base:.4f}, fp8 W8A8 {fp8:.4f} ({fp8 / base - 1:+.2%}); "
          f"top-1 agreement {agree:.1%}")
    assert abs(fp8 / base - 1) < 0.06
    assert agree >= 0.90


def test_gguf_served_quantized_perplexity_within_1_percent_of_transformers(
    measured: Measured, smollm2_source: loader.ModelSource, text_ids: list[int]
) -> None:
    from transformers import AutoModelForCausalLM

    # transformers' own dequantization of the file (what the dequantized cache holds).
    hf = AutoModelForCausalLM.from_pretrained(smollm2_source.model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor([text_ids])).logits[0].float()
    reference, served = perplexity(hf_logits, text_ids), perplexity(measured.logits["gguf"], text_ids)
    print(f"perplexity: transformers (dequantized GGUF) {reference:.4f}, GGUF served quantized "
          f"{served:.4f} ({served / reference - 1:+.3%})")
    assert abs(served / reference - 1) < 0.01


def test_greedy_tokens_agree_with_unquantized(measured: Measured) -> None:
    greedy = measured.greedy
    base = greedy["none"]
    n = len(base)
    whole = {q: sum(a == b for a, b in zip(greedy[q], base, strict=True)) for q in greedy}
    first = {q: sum(a[0] == b[0] for a, b in zip(greedy[q], base, strict=True)) for q in greedy}
    print("greedy 16-token continuations equal to the unquantized model's: "
          + ", ".join(f"{q} {whole[q]}/{n} (first token {first[q]}/{n})" for q in greedy if q != "none"))
    assert whole["gguf"] == n
    assert first["fp8"] >= 6
